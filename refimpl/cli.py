"""`refimpl` on the command line.

    refimpl train [--config FILE] [--backend NAME] [--steps N] [--out DIR] [--set KEY.PATH=VALUE ...] [--resume DIR]
    refimpl backends
    refimpl consolidate RUN_OR_CKPT OUT.safetensors
    refimpl estimate --params 3B [--gpus N --nodes M ...]
    refimpl crosscheck [--config FILE] [--set K=V ...] --against torch|deepspeed [--steps N] [--fp64-arbiter]
    mpiexec -n 4 refimpl train ...          (real processes; the MPI world decides world_size)
    mpirun -n 2 refimpl train --backend cupy ...   (one GPU per process; collectives over NCCL)

Bad input (config, data path, backend, checkpoint, run directory) is one clear line on stderr and exit code 2,
never a traceback from deep inside.
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings
from dataclasses import fields

from .backend import BackendError, available_backends, get_backend
from .checkpoint import CheckpointError, consolidate, read_manifest
from .comm.base import CommError
from .comm.mpi import launched_under_mpi
from .crosscheck.torch_side import PeerError
from .crosscheck.trace import TraceError
from .config import CLI_DEFAULT_CONFIG, ConfigError, load_config, parse_override, validate
from .data import DataError
from .deepspeed_keys import DeepSpeedKeyWarning
from .lock import LockError
from .loss_scaler import MinLossScaleError
from .memory.budget import TierBudgetError
from .memory.swap_files import SwapError
from .memory.param_offload import BufferPoolError
from .train import RunDirError, train

USER_ERRORS = (ConfigError, DataError, BackendError, CheckpointError, RunDirError, SwapError, BufferPoolError,
               TierBudgetError, PeerError, TraceError, LockError)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (exit 2) like every other error of refimpl's."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="refimpl", description="A readable reference implementation of ZeRO-Infinity.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a transformer (no arguments: the embedded default run)")
    t.add_argument("--config", metavar="FILE", help="JSON or TOML config (DeepSpeed's section names)")
    t.add_argument("--backend", metavar="NAME", help="kernel backend (see `refimpl backends`)")
    t.add_argument("--steps", type=int, metavar="N", help="optimizer steps to run in total (run.steps)")
    t.add_argument("--out", metavar="DIR", help="run directory (default runs/<timestamp>/); must be new or empty")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config value, e.g. --set optimizer.params.lr=1e-3 (repeatable)")
    t.add_argument("--resume", metavar="DIR", help="continue from a run, checkpoint or global_stepN directory")
    t.add_argument("--world-size", type=int, metavar="N",
                   help="data-parallel ranks, simulated as threads (under mpiexec the MPI world decides)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_parser("backends", help="list installed backends and whether each can run here")
    c = sub.add_parser("consolidate", help="whole fp32 weights from a (partitioned) checkpoint (zero_to_fp32)")
    c.add_argument("checkpoint", metavar="RUN_OR_CKPT", help="a run, checkpoint or global_stepN directory")
    c.add_argument("output", metavar="OUT.safetensors")
    c.add_argument("--force", action="store_true", help="replace OUT.safetensors if it exists")
    from . import crosscheck
    x = sub.add_parser("crosscheck", help="hold refimpl against PyTorch or DeepSpeed, step by step",
                       description=crosscheck.__doc__.split("\n\n")[2])
    crosscheck.add_arguments(x)
    from . import estimate
    e = sub.add_parser("estimate", help="memory and bandwidth arithmetic of ZeRO / ZeRO-Infinity for a model size",
                       description=estimate.DESCRIPTION)
    estimate.add_arguments(e)
    return p


def _train_config(args, mpi_world=None) -> dict:
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"run.steps={args.steps}")
    if args.backend is not None:
        overrides.append(f"backend={args.backend}")
    if args.world_size is not None:
        overrides.append(f"world_size={args.world_size}")
    if mpi_world is not None:
        overrides.append(f"world_size={mpi_world}")  # the MPI launch decides the world
    if args.resume is None:   # no file: the embedded default run, ZeRO-Infinity (config.INFINITY_RUN)
        return load_config(args.config, overrides, base=CLI_DEFAULT_CONFIG if args.config is None else None)
    # Resuming: the checkpoint's resolved config is the base; a --config must describe the same model.
    _, manifest = read_manifest(args.resume)
    saved = manifest["config"]
    if args.config is None:
        cfg = load_config(None, overrides, base=_checkpoint_base(saved))
        _check_same_run(cfg, saved, args.resume, "--set")
        _refuse_checkpoint_paths(cfg, overrides, args.resume)
        return cfg
    cfg = load_config(args.config, overrides)
    _check_same_run(cfg, saved, args.resume, args.config)
    return cfg


def _checkpoint_base(saved: dict) -> dict:
    """A checkpoint's config as the base of a resumed run, less what a checkpoint does not decide: where the run
    writes (run.out: --out or a new directory) and, when REFIMPL_BACKEND is set, the backend."""
    import copy
    import os
    base = copy.deepcopy(saved)
    if isinstance(base.get("run"), dict):
        base["run"]["out"] = None
    if os.environ.get("REFIMPL_BACKEND"):
        base["backend"] = None
    return base


# Paths a checkpoint's config could point anywhere: a resumed run takes them only from the user (--set, --config)
_PATH_KEYS = (("zero_optimization", "offload_param", "nvme_path"), ("zero_optimization", "offload_optimizer",
                                                                    "nvme_path"), ("data", "path"))


def _refuse_checkpoint_paths(cfg, overrides, ckpt_path) -> None:
    """A relative swap folder stays inside the new run directory; any other path the checkpoint names (absolute,
    or climbing out with ..) is refused unless the command line (a --set of it or of a section above it) names it."""
    from pathlib import PurePath
    given = [".".join(parse_override(o)[0]) for o in overrides]

    def get(c, keys):
        for k in keys:
            c = c.get(k) if isinstance(c, dict) else None
        return c
    for keys in _PATH_KEYS:
        value, key = get(cfg, keys), ".".join(keys)
        if value is None or any(key == g or key.startswith(g + ".") for g in given):
            continue              # not set, or the user's own choice
        p = PurePath(value)
        if keys[0] == "data" or p.is_absolute() or ".." in p.parts:
            raise CheckpointError(f"checkpoint {str(ckpt_path)!r} sets {key} to {value!r}; a resumed run takes paths "
                                  f"outside its own run directory only from you: pass --set {key}=PATH (the same "
                                  f"or another) to resume with it")


def _check_same_run(cfg, saved, ckpt_path, source) -> None:
    """A resumed run must have the checkpoint's model and precision; name every key that differs."""
    from .model import ModelConfig
    order = [f.name for f in fields(ModelConfig)]
    # a checkpoint from before a model key existed was trained with that key's default (e.g. model.dtype)
    try:
        saved_model = validate(copy.deepcopy(saved))["model"]
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {ckpt_path!r} holds an invalid config: {exc}") from None
    diff = sorted((k for k in cfg["model"] if cfg["model"][k] != saved_model.get(k)),
                  key=lambda k: order.index(k) if k in order else len(order))
    if diff:
        k = diff[0]
        also = f" (also differ: {', '.join('model.' + d for d in diff[1:])})" if diff[1:] else ""
        raise CheckpointError(f"checkpoint {ckpt_path!r} is from a different model: model.{k} is "
                              f"{saved_model.get(k)!r} there and {cfg['model'][k]!r} in {source}{also}")
    if cfg["zero_optimization"]["stage"] != saved["zero_optimization"]["stage"]:
        raise CheckpointError(f"checkpoint {ckpt_path!r} was written at ZeRO stage {saved['zero_optimization']['stage']}; "
                              f"resuming at stage {cfg['zero_optimization']['stage']} ({source}) is not supported")
    for section in ("fp16", "bf16"):
        if cfg[section]["enabled"] != saved[section]["enabled"]:
            raise CheckpointError(f"checkpoint {ckpt_path!r} was trained with {section}.enabled="
                                  f"{str(saved[section]['enabled']).lower()}; resuming with "
                                  f"{str(cfg[section]['enabled']).lower()} ({source}) is not supported")


def _format_warning(message, category, filename, lineno, line=None):
    """DeepSpeed keys refimpl accepts without acting on them: one plain line each, no source excerpt."""
    if issubclass(category, DeepSpeedKeyWarning):
        return f"refimpl: warning: {message}\n"
    return _default_formatwarning(message, category, filename, lineno, line)


_default_formatwarning = warnings.formatwarning


def main(argv=None) -> int:
    warnings.formatwarning = _format_warning
    args = _parser().parse_args(argv)
    comm = None
    try:
        if args.command == "backends":
            for name, why in available_backends().items():
                print(f"{name:10s} {'ok' if why is None else 'unusable: ' + why}")
            return 0
        if args.command == "estimate":
            from . import estimate
            return estimate.run(args)
        if args.command == "crosscheck":
            from .crosscheck import run
            return run(args)
        if args.command == "consolidate":
            out = consolidate(args.checkpoint, args.output, force=args.force)
            print(f"wrote {out}")
            return 0
        if launched_under_mpi():
            from .comm.mpi import MPIComm
            comm = MPIComm()
        config = _train_config(args, None if comm is None else comm.world_size)
        if comm is not None:
            comm.timeout = config["run"]["comm_timeout"]
            if get_backend(config["backend"]).is_gpu:   # one GPU per process: the collectives go over NCCL
                from .comm.nccl import NCCLComm
                comm.close()
                comm = NCCLComm(timeout=config["run"]["comm_timeout"])
        from .report import format_summary
        summary = train(config, args.out, resume=args.resume, progress=not args.no_progress, comm=comm)
        if comm is None or comm.rank == 0:
            print(format_summary(summary))
        return 0
    except USER_ERRORS as exc:
        print(f"refimpl: error: {_on_rank(comm)}{_one_line(exc)}", file=sys.stderr)
        _end_job(comm, 2)
        return 2
    except (CommError, MinLossScaleError) as exc:  # a rank failed, a collective timed out, fp16 gave up
        print(f"refimpl: error: {_on_rank(comm)}{_one_line(exc)}", file=sys.stderr)
        _end_job(comm, 1)
        return 1
    except OSError as exc:                         # the machine refused: a full disk, a file that vanished, ...
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"refimpl: error: {_on_rank(comm)}{_one_line(where)}{exc.strerror or exc}", file=sys.stderr)
        _end_job(comm, 2)
        return 2
    except MemoryError:
        print(f"refimpl: error: {_on_rank(comm)}out of memory (a smaller model, batch or world_size, or "
              f"offload_param/offload_optimizer, needs less)", file=sys.stderr)
        _end_job(comm, 2)
        return 2
    except Exception:                              # a bug; under MPI the other ranks must not wait for us
        if comm is not None and comm.world_size > 1:
            import traceback
            traceback.print_exc()
            _end_job(comm, 1)
        raise
    except KeyboardInterrupt:
        print("refimpl: interrupted", file=sys.stderr)
        return 130


def _one_line(message) -> str:
    """An error message as one line: characters a terminal would not print as themselves (newlines, NEL, other
    control characters a user's input may carry) are written as their escapes."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(message))


def _on_rank(comm) -> str:
    return "" if comm is None or comm.world_size == 1 else f"rank {comm.rank}: "


def _end_job(comm, code: int) -> None:
    """Under MPI, a rank that stops ends the whole job at once (the others would wait run.comm_timeout)."""
    if comm is not None and comm.world_size > 1 and hasattr(comm, "abort"):
        comm.abort(code)


if __name__ == "__main__":
    sys.exit(main())
