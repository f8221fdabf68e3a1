"""Checkpoints: safetensors for arrays, a JSON manifest for everything else, never pickle.

Layout (DeepSpeed's: one directory per tag and a `latest` file naming the newest tag):

    checkpoint/
      latest                        "global_step300"
      global_step300/
        manifest.json               format, step, config, counters, loss scaler, parameter table, sha256 of the
                                    files and of the manifest itself
        model.safetensors           parameters by name, in their stored dtype (fp32/fp16/bf16)
        optimizer.safetensors       flat fp32 master weights and Adam moments

A tag directory is written under a temporary name and renamed into place, and `latest` is replaced
atomically after that, so a crash never leaves a half-written checkpoint as the latest one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

FORMAT = "refimpl-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not belong to this model."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root, state: dict, config: dict, *, extra: dict | None = None) -> Path:
    """Write `state` (Engine.state_dict()) under root/global_step{N}/ and point root/latest at it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    step = state["counters"]["global_steps"]
    tag = f"global_step{step}"
    final = root / tag
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{tag}.tmp-"))
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in state["params"].items()}, str(tmp / "model.safetensors"))
        save_file(state["optimizer"], str(tmp / "optimizer.safetensors"))
        manifest = {
            "format": FORMAT,
            "tag": tag,
            "step": step,
            "counters": state["counters"],
            "loss_scaler": state["loss_scaler"],
            "parameters": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in state["params"].items()},
            "config": config,
            "files": {name: _sha256(tmp / name) for name in ("model.safetensors", "optimizer.safetensors")},
            **(extra or {}),
        }
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if final.exists():  # re-saving the same step: move the old one aside first, drop it after
            old = Path(tempfile.mkdtemp(dir=root, prefix=f".{tag}.old-"))
            os.replace(final, old / tag)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(root / "latest", tag)
    return final


def resolve(path) -> Path:
    """A run directory, a checkpoint root (with `latest`) or a tag directory -> the tag directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist")
    if (p / "checkpoint").is_dir():
        p = p / "checkpoint"
    if (p / "latest").is_file():
        tag = (p / "latest").read_text().strip()
        if not (p / tag).is_dir():
            raise CheckpointError(f"{p / 'latest'} names {tag!r}, which is not a directory in {p}")
        p = p / tag
    if not (p / "manifest.json").is_file():
        raise CheckpointError(f"no checkpoint in {str(path)!r}: expected a run directory, a checkpoint directory "
                              f"with a 'latest' file, or a global_stepN directory with manifest.json")
    return p


def read_manifest(path) -> tuple[Path, dict]:
    tag_dir = resolve(path)
    try:
        manifest = json.loads((tag_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"unreadable manifest {tag_dir / 'manifest.json'}: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{tag_dir / 'manifest.json'}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise CheckpointError(f"{tag_dir / 'manifest.json'} is corrupt: its contents do not match its manifest_sha256")
    return tag_dir, manifest


def _manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without this field: the manifest checks itself too."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def load_checkpoint(path, expected_params: dict[str, tuple] | None = None) -> tuple[dict, dict]:
    """Read and verify a checkpoint. Returns (state for Engine.load_state_dict, manifest).

    expected_params: name -> shape of the model it will be loaded into; a mismatch is a CheckpointError
    that names the first differing parameter."""
    tag_dir, manifest = read_manifest(path)
    if expected_params is not None:
        _check_same_model(tag_dir, manifest["parameters"], expected_params)
    for name, digest in manifest["files"].items():
        f = tag_dir / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint file {f} is corrupt: its sha256 does not match the manifest")
    state = {
        "params": load_file(str(tag_dir / "model.safetensors")),
        "optimizer": load_file(str(tag_dir / "optimizer.safetensors")),
        "counters": manifest["counters"],
        "loss_scaler": manifest["loss_scaler"],
    }
    return state, manifest


def _check_same_model(tag_dir, saved: dict, expected: dict) -> None:
    for name, shape in expected.items():
        if name not in saved:
            raise CheckpointError(f"checkpoint {tag_dir} is from a different model: it has no parameter {name!r}")
        if tuple(saved[name]["shape"]) != tuple(shape):
            raise CheckpointError(f"checkpoint {tag_dir} is from a different model: parameter {name!r} has shape "
                                  f"{tuple(saved[name]['shape'])} there and {tuple(shape)} in this model")
    extra = sorted(set(saved) - set(expected))
    if extra:
        raise CheckpointError(f"checkpoint {tag_dir} is from a different model: it has parameters this model "
                              f"lacks, e.g. {extra[0]!r}")
