"""What a checkpoint must be before anything in it is used (refimpl/checkpoint.py loads through these checks).

A checkpoint may come from anyone, and the manifest's sha256 of itself only catches accidents: whoever edits a
manifest can recompute it. So each part is checked on its own merits, and anything else is refused with one line
naming the file, the entry and what was expected:
- the manifest: UTF-8 JSON of bounded size and depth, an object with every key refimpl reads, of the right type
  and range (``check_manifest``);
- every tensor loaded from a safetensors file: a file the safetensors library can parse, holding exactly the
  tensors expected, each of the dtype and shape the run expects, with finite values (and Adam's second moment
  not negative) (``check_tensors``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

MAX_MANIFEST_BYTES = 64 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not belong to this run."""


def load_json(path: Path, what: str):
    """A small UTF-8 JSON file, or a CheckpointError naming it (too large, not UTF-8, malformed, too deep)."""
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise CheckpointError(f"{what} {path} is {size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}")
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except CheckpointError:
        raise
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{what} {path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except RecursionError:
        raise CheckpointError(f"{what} {path} is nested too deeply to be a manifest") from None
    except OSError as exc:
        raise CheckpointError(f"{what} {path} is unreadable: {exc.strerror or exc}") from None


def _int(v, lo=0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


# key -> (check, what is allowed): the fields of a manifest refimpl reads
_TOP = {
    "format": (lambda v: isinstance(v, str), "a string"),
    "tag": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "step": (_int, "an integer >= 0"),
    "counters": (lambda v: isinstance(v, dict) and all(_int(v.get(k)) for k in (
        "global_steps", "skipped_steps", "micro_steps", "optimizer_step")),
        "an object with integers >= 0 global_steps, skipped_steps, micro_steps, optimizer_step"),
    "loss_scaler": (lambda v: isinstance(v, dict), "an object"),
    "zero": (lambda v: isinstance(v, dict) and _int(v.get("stage")) and v["stage"] <= 3 and _int(v.get("world_size"), 1)
             and _int(v.get("partition_count"), 1),
             "an object with stage 0-3, world_size >= 1 and partition_count >= 1"),
    "parameters": (lambda v: isinstance(v, list) and bool(v) and all(
        isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("dtype"), str)
        and isinstance(p.get("shape"), list) and all(_int(d) for d in p["shape"]) for p in v),
        "a non-empty list of {name, shape (integers >= 0), dtype}"),
    "config": (lambda v: isinstance(v, dict), "an object"),
    "files": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(h, str) and _SHA256.match(h)
                                                    for k, h in v.items()),
              "an object of file name -> sha256 (64 hex digits)"),
}


def check_manifest(manifest, path: Path) -> dict:
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(manifest).__name__}")
    for key, (ok, allowed) in _TOP.items():
        if key not in manifest:
            raise CheckpointError(f"{path} lacks the key {key!r} ({allowed})")
        if not ok(manifest[key]):
            raise CheckpointError(f"{path}: {key!r} must be {allowed}, found {str(manifest[key])[:80]!r}")
    names = [p["name"] for p in manifest["parameters"]]
    if len(set(names)) != len(names):
        raise CheckpointError(f"{path}: 'parameters' names a parameter twice")
    return manifest


def load_tensors(path: Path) -> dict:
    """safetensors -> name -> array; a file the library cannot parse (bad header length, offsets out of range,
    unknown dtype) is a CheckpointError naming it."""
    from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    except Exception as exc:   # noqa: BLE001 -- SafetensorError and the library's other parse errors
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint file {path} is not a valid safetensors file: {detail}") from None


def check_tensors(path: Path, tensors: dict, expected: dict, nonnegative=()) -> None:
    """Exactly the tensors of ``expected`` (name -> (dtype, shape)), each of that dtype and shape, all finite;
    those in ``nonnegative`` also >= 0."""
    missing = [n for n in expected if n not in tensors]
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"lacks tensor {missing[0]!r}" if missing else f"has an unexpected tensor {extra[0]!r}"
        raise CheckpointError(f"checkpoint file {path} {what}; expected exactly {sorted(expected)[:6]}")
    for name, (dtype, shape) in expected.items():
        arr = tensors[name]
        if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"checkpoint file {path}: tensor {name!r} is {arr.dtype} of shape "
                                  f"{tuple(arr.shape)}, expected {np.dtype(dtype)} of shape {tuple(shape)}")
        flat = arr.reshape(-1)
        bad = int(np.count_nonzero(~np.isfinite(flat.astype(np.float32) if flat.dtype.itemsize < 4 else flat)))
        if bad:
            raise CheckpointError(f"checkpoint file {path}: tensor {name!r} holds {bad} non-finite values (inf/nan); "
                                  f"expected finite values")
        if name in nonnegative and (flat < 0).any():
            raise CheckpointError(f"checkpoint file {path}: tensor {name!r} holds negative values; Adam's second "
                                  f"moment is never negative")
