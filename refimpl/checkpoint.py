"""Checkpoints: safetensors for arrays, a JSON manifest for everything else, never pickle.

Layout (DeepSpeed's: one directory per tag, a `latest` file naming the newest tag, one optimizer file per rank):

    checkpoint/
      latest                                      "global_step300"
      global_step300/
        manifest.json                             step, config, counters, loss scaler, ZeRO stage and partition
                                                  count, parameter table, sha256 of every file and of itself
        model.safetensors                         whole low-precision parameters by name
        zero_pp_rank_{r}_optim_states.safetensors rank r's fp32 partition: master, exp_avg, exp_avg_sq

Every rank calls `save_checkpoint` together (stage 3 must all-gather the parameters); each writes its own
partition into a temporary directory, rank 0 writes the rest and renames the directory into place, then
replaces `latest` atomically: a crash never leaves a half-written checkpoint as the latest one.

Because refimpl partitions every parameter the same way at every stage (refimpl/zero/partition.py), loading
at a different world size is per-parameter arithmetic: unpartition with the old count, partition with the new
(`load_checkpoint`), and `zero_to_fp32` is the same first half (DeepSpeed's zero_to_fp32.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .checkpoint_verify import CheckpointError, check_manifest, check_tensors, load_json, load_tensors
from .zero.partition import PartitionLayout

FORMAT = "refimpl-checkpoint-v2"
OPTIM_KEYS = ("master", "exp_avg", "exp_avg_sq")
__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "read_manifest", "resolve", "zero_to_fp32",
           "consolidate", "full_optimizer_state"]


def optim_file(rank: int) -> str:
    return f"zero_pp_rank_{rank}_optim_states.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without this field: the manifest checks itself too."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _agree(comm, error, what: str) -> None:
    """Every rank learns which ranks failed `what`, and all raise together, so none waits forever: the rank
    that failed raises its own error, the others a CheckpointError naming it."""
    flags = np.zeros(comm.world_size, dtype=np.float64)
    flags[comm.rank] = float(error is not None)
    bad = np.nonzero(comm.all_reduce(flags))[0].tolist()
    if error is not None:
        raise error
    if bad:
        raise CheckpointError(f"{what} failed on rank(s) {bad}")


# ---------------------------------------------------------------------------------------------- save
def save_checkpoint(root, engine, config: dict) -> Path:
    """Write the engine's state under root/global_step{N}/ and point root/latest at it. Collective. A failure
    to write (a full disk) is a CheckpointError; the checkpoints already there, and `latest`, are untouched."""
    try:
        return _save(root, engine, config)
    except OSError as exc:
        root = Path(root)
        kept = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
        where = f" ({exc.filename})" if exc.filename else ""
        raise CheckpointError(f"cannot write checkpoint global_step{engine.global_steps} in {root}: "
                              f"{exc.strerror or exc}{where}; "
                              + (f"the last complete checkpoint, {kept}, is intact" if kept else
                                 "no earlier checkpoint exists")) from None


def _save(root, engine, config: dict) -> Path:
    comm, zero, rank = engine.comm, engine.zero, engine.comm.rank
    root = Path(root)
    tag = f"global_step{engine.global_steps}"
    final, tmp = root / tag, root / f".{tag}.tmp"
    params = {k: np.ascontiguousarray(engine.backend.to_numpy(v)) for k, v in zero.full_params().items()}
    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            clean_leftovers(root)                   # of a crashed save
            tmp.mkdir()
        except OSError as exc:
            error = exc
    _agree(comm, error, f"creating {tmp}")
    try:
        if rank < zero.layout.num_partitions:  # stage 0 has one partition: rank 0 writes it
            save_file(engine.optimizer.partitions(), str(tmp / optim_file(rank)))
    except BaseException as exc:  # reported to every rank by _agree, then re-raised on this one
        error = exc
    try:
        _agree(comm, error, f"writing the optimizer partitions of {final}")  # all partitions are on disk now
        if rank == 0:
            try:
                _finish(root, tmp, final, tag, params, engine, config)
            except BaseException as exc:
                error = exc
        _agree(comm, error, f"finishing checkpoint {final}")
    finally:
        if rank == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written temporary behind
    return final


def _finish(root, tmp, final, tag, params, engine, config) -> None:
    zero = engine.zero
    save_file(params, str(tmp / "model.safetensors"))
    files = ["model.safetensors"] + [optim_file(r) for r in range(zero.layout.num_partitions)]
    manifest = {
        "format": FORMAT,
        "tag": tag,
        "step": engine.global_steps,
        "counters": engine.counters(),
        "loss_scaler": engine.loss_scaler.state_dict(),
        "zero": {"stage": zero.stage, "world_size": engine.world_size, "partition_count": zero.layout.num_partitions},
        # a list, not a mapping: the order of parameters defines the partition layout (JSON keys get sorted)
        "parameters": [{"name": s.name, "shape": list(s.shape), "dtype": str(params[s.name].dtype)}
                       for s in zero.layout.slots],
        "config": config,
        "files": {name: _sha256(tmp / name) for name in files},
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
    _atomic_write_text(root / "latest", tag)


# ---------------------------------------------------------------------------------------------- load
def _inside(parent: Path, name: str, what: str) -> Path:
    """parent/name, where name comes from a file of the checkpoint: one plain path component, not a symlink, so
    nothing a checkpoint says can lead outside it."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise CheckpointError(f"{what} names {name!r}; expected a directory name inside {parent}")
    child = parent / name
    if child.is_symlink():
        raise CheckpointError(f"{what} names {name!r}, a symbolic link in {parent}; a checkpoint is never read "
                              f"through a link")
    return child


TAG = re.compile(r"global_step(\d+)")
LEFTOVER = re.compile(r"\.(global_step\d+\.tmp|global_step\d+\.old-.*|latest\..*)")


def clean_leftovers(root: Path) -> list[str]:
    """Remove what a crashed save leaves in a checkpoint root (``.global_stepN.tmp/``, ``.global_stepN.old-*/``,
    ``.latest.*``); never a finished checkpoint. The caller holds the run directory (its lock), so no save of
    another run is in progress there. Returns the names removed."""
    removed = []
    for entry in root.iterdir():
        if LEFTOVER.fullmatch(entry.name) and not entry.is_symlink():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def _tags(root: Path) -> list[Path]:
    """root's global_stepN directories (not links), newest first."""
    found = [(int(m.group(1)), d) for d in root.iterdir()
             if (m := TAG.fullmatch(d.name)) and d.is_dir() and not d.is_symlink()]
    return [d for _, d in sorted(found, reverse=True)]


def _tag_step(tag_dir: Path) -> int:
    m = TAG.fullmatch(tag_dir.name)
    return int(m.group(1)) if m else -1


def _complete(tag_dir: Path) -> bool:
    """A tag whose manifest reads and whose every file is there with its sha256 (what a finished save leaves)."""
    try:
        _, manifest = read_manifest(tag_dir)
        return all(_sha256(_inside(tag_dir, name, str(tag_dir))) == digest
                   for name, digest in manifest["files"].items())
    except (CheckpointError, OSError):
        return False


def resolve(path) -> Path:
    """A run directory, a checkpoint root (with `latest`) or a tag directory -> the tag directory.

    `latest` names the newest checkpoint. When it is missing, or stale (it names a tag that is gone, or an older
    one than a complete global_stepN beside it: a crash between the rename of a finished save and the update of
    `latest`), the newest complete, verified global_stepN is taken instead."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist")
    if (p / "checkpoint").is_dir():
        p = _inside(p, "checkpoint", f"run directory {p}")
    if (p / "manifest.json").is_file():
        return p                                        # a tag directory itself
    named = None
    if (p / "latest").exists() or (p / "latest").is_symlink():
        try:
            tag = _inside(p, "latest", f"checkpoint {p}").read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{p / 'latest'} is unreadable: {exc}") from None
        named = _inside(p, tag, str(p / "latest"))
    usable = named is not None and named.is_dir() and (named / "manifest.json").is_file()
    newer = [d for d in _tags(p) if not usable or _tag_step(d) > _tag_step(named)]
    for candidate in newer:                  # saves newer than `latest` (or all of them, without a usable one)
        if _complete(candidate):
            return candidate
    if usable:
        return named
    if named is not None:
        raise CheckpointError(f"{p / 'latest'} names {named.name!r}, which is not a checkpoint directory in {p}, "
                              f"and no complete global_stepN is beside it")
    if newer:
        raise CheckpointError(f"no complete checkpoint in {p}: {', '.join(d.name for d in newer[:3])} "
                              f"{'is' if len(newer) == 1 else 'are'} incomplete or corrupt")
    raise CheckpointError(f"no checkpoint in {str(path)!r}: expected a run directory, a checkpoint directory "
                          f"with a 'latest' file, or a global_stepN directory with manifest.json")


def read_manifest(path) -> tuple[Path, dict]:
    tag_dir = resolve(path)
    file = _inside(tag_dir, "manifest.json", f"checkpoint {tag_dir}")
    manifest = check_manifest(load_json(file, "manifest"), file)   # its shape, before any field is used
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{tag_dir / 'manifest.json'}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise CheckpointError(f"{tag_dir / 'manifest.json'} is corrupt: its contents do not match its manifest_sha256")
    return tag_dir, manifest


def _verified(tag_dir: Path, manifest: dict, name: str) -> dict:
    f = _inside(tag_dir, name, f"{tag_dir / 'manifest.json'}")
    if name not in manifest["files"]:
        raise CheckpointError(f"{tag_dir / 'manifest.json'} lists no file {name}")
    if not f.is_file():
        raise CheckpointError(f"checkpoint file {f} is missing")
    if _sha256(f) != manifest["files"][name]:
        raise CheckpointError(f"checkpoint file {f} is corrupt: its sha256 does not match the manifest")
    return load_tensors(f)


def master_dtype(manifest: dict) -> np.dtype:
    """The dtype of the fp32 master weights and moments a checkpoint holds (float64 for an fp64 reference run)."""
    model = manifest["config"].get("model") if isinstance(manifest["config"].get("model"), dict) else {}
    return np.dtype(np.float64 if model.get("dtype") == "float64" else np.float32)


def _verified_model(tag_dir: Path, manifest: dict, dtype=None) -> dict:
    """model.safetensors, verified: every parameter of the manifest's table, of its shape and ``dtype`` (by
    default the table's), finite."""
    import ml_dtypes  # noqa: F401  -- "bfloat16" as a numpy dtype name (pyflakes: used by its import)
    tensors = _verified(tag_dir, manifest, "model.safetensors")
    try:
        expected = {p["name"]: (dtype if dtype is not None else np.dtype(p["dtype"]), tuple(p["shape"]))
                    for p in manifest["parameters"]}
    except TypeError:
        raise CheckpointError(f"{tag_dir / 'manifest.json'}: a parameter's dtype is not a numpy dtype name") from None
    check_tensors(tag_dir / "model.safetensors", tensors, expected)
    return tensors


def full_optimizer_state(path, dtype=None) -> tuple[dict, dict]:
    """{"master"|"exp_avg"|"exp_avg_sq": {param name: full fp32 array}} from all partitions, and the manifest.
    Every partition is verified: its sha256, then each tensor's dtype (``dtype``, by default the manifest's
    master dtype), shape (the manifest's layout) and values (finite; exp_avg_sq >= 0)."""
    tag_dir, manifest = read_manifest(path)
    count = manifest["zero"]["partition_count"]
    layout = PartitionLayout([(p["name"], tuple(p["shape"])) for p in manifest["parameters"]], count)
    dtype = master_dtype(manifest) if dtype is None else np.dtype(dtype)
    shards = []
    for r in range(count):
        shard = _verified(tag_dir, manifest, optim_file(r))
        check_tensors(tag_dir / optim_file(r), shard, {k: (dtype, (layout.partition_numel,)) for k in OPTIM_KEYS},
                      nonnegative=("exp_avg_sq",))
        shards.append(shard)
    full = {key: layout.unpartition(np.stack([s[key] for s in shards])) for key in OPTIM_KEYS}
    return full, manifest


def check_same_model(tag_dir, saved_list: list, expected: dict) -> None:
    saved = {p["name"]: p for p in saved_list}
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
    if [p["name"] for p in saved_list] != list(expected):
        raise CheckpointError(f"checkpoint {tag_dir} lists the parameters in another order than this model")


def load_checkpoint(path, engine) -> dict:
    """Load a checkpoint into `engine`, resharding to its world size. Every rank calls it; returns the manifest."""
    tag_dir, manifest = read_manifest(path)
    check_same_model(tag_dir, manifest["parameters"], {s.name: s.shape for s in engine.zero.layout.slots})
    if manifest["zero"]["stage"] != engine.zero.stage:
        raise CheckpointError(f"checkpoint {tag_dir} was written at ZeRO stage {manifest['zero']['stage']}; this "
                              f"run uses stage {engine.zero.stage} (resume with the same zero_optimization.stage)")
    _verified_model(tag_dir, manifest, engine.dtype)  # integrity; the parameters follow from the master weights
    full, _ = full_optimizer_state(tag_dir, engine.zero.master_dtype)
    engine.zero.load_full_state(full)
    engine.load_counters(manifest["counters"], manifest["loss_scaler"])
    return manifest


def zero_to_fp32(path) -> dict:
    """Whole fp32 master weights by parameter name, without padding (DeepSpeed's zero_to_fp32), from a checkpoint
    whose model.safetensors and optimizer partitions all verify."""
    tag_dir, manifest = read_manifest(path)
    _verified_model(tag_dir, manifest)
    full, _ = full_optimizer_state(tag_dir)
    return full["master"]


def consolidate(path, out, force: bool = False) -> Path:
    """Write zero_to_fp32(path) as one safetensors file, via a temporary name and a rename. An existing output is
    refused unless ``force``; so is any output inside the checkpoint's own folder (its `latest`, its tags)."""
    out = Path(out)
    if not out.name or out.name in (".", ".."):
        raise CheckpointError(f"consolidate output {str(out)!r} is not a file name")
    tag_dir = resolve(path)
    root = tag_dir.parent.resolve()
    target = out.resolve() if out.parent.exists() else out.parent.resolve() / out.name
    if target == root or root in target.parents:
        raise CheckpointError(f"consolidate output {str(out)!r} is inside the checkpoint folder {root}; write it "
                              f"elsewhere (nothing of a checkpoint is overwritten)")
    if out.is_dir():
        raise CheckpointError(f"consolidate output {str(out)!r} is a directory; give a file name like "
                              f"{out / 'weights.safetensors'}")
    if (out.exists() or out.is_symlink()) and not force:
        raise CheckpointError(f"consolidate output {str(out)!r} exists; choose another name or pass --force to "
                              f"replace it")
    weights = {k: np.ascontiguousarray(v) for k, v in zero_to_fp32(tag_dir).items()}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    except OSError as exc:
        raise CheckpointError(f"cannot write consolidate output {str(out)!r}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        save_file(weights, tmp)
        os.replace(tmp, out)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"cannot write consolidate output {str(out)!r}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
