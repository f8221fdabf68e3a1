"""`refimpl` on the command line.

    refimpl train [--config FILE] [--backend NAME] [--steps N] [--out DIR] [--set KEY.PATH=VALUE ...] [--resume DIR]
    refimpl backends

Bad input (config, data path, backend, checkpoint, run directory) is one clear line on stderr and exit code 2,
never a traceback from deep inside.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .backend import BackendError, available_backends
from .checkpoint import CheckpointError, read_manifest
from .config import ConfigError, load_config
from .data import DataError
from .train import RunDirError, train

USER_ERRORS = (ConfigError, DataError, BackendError, CheckpointError, RunDirError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refimpl", description="A readable reference implementation of ZeRO-Infinity.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a transformer (no arguments: the embedded default run)")
    t.add_argument("--config", metavar="FILE", help="JSON or TOML config (DeepSpeed's section names)")
    t.add_argument("--backend", metavar="NAME", help="kernel backend (see `refimpl backends`)")
    t.add_argument("--steps", type=int, metavar="N", help="optimizer steps to run in total (run.steps)")
    t.add_argument("--out", metavar="DIR", help="run directory (default runs/<timestamp>/); must be new or empty")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config value, e.g. --set optimizer.params.lr=1e-3 (repeatable)")
    t.add_argument("--resume", metavar="DIR", help="continue from a run, checkpoint or global_stepN directory")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_parser("backends", help="list installed backends and whether each can run here")
    return p


def _train_config(args) -> dict:
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"run.steps={args.steps}")
    if args.backend is not None:
        overrides.append(f"backend={args.backend}")
    if args.resume is None:
        return load_config(args.config, overrides)
    # Resuming: the checkpoint's resolved config is the base; a --config must describe the same model.
    _, manifest = read_manifest(args.resume)
    saved = manifest["config"]
    if args.config is None:
        cfg = load_config(None, overrides, base=saved)
        _check_same_run(cfg, saved, args.resume, "--set")
        return cfg
    cfg = load_config(args.config, overrides)
    _check_same_run(cfg, saved, args.resume, args.config)
    return cfg


def _check_same_run(cfg, saved, ckpt_path, source) -> None:
    """A resumed run must have the checkpoint's model and precision; name every key that differs."""
    from .model import ModelConfig
    order = [f.name for f in fields(ModelConfig)]
    diff = sorted((k for k in cfg["model"] if cfg["model"][k] != saved["model"].get(k)),
                  key=lambda k: order.index(k) if k in order else len(order))
    if diff:
        k = diff[0]
        also = f" (also differ: {', '.join('model.' + d for d in diff[1:])})" if diff[1:] else ""
        raise CheckpointError(f"checkpoint {ckpt_path!r} is from a different model: model.{k} is "
                              f"{saved['model'].get(k)!r} there and {cfg['model'][k]!r} in {source}{also}")
    for section in ("fp16", "bf16"):
        if cfg[section]["enabled"] != saved[section]["enabled"]:
            raise CheckpointError(f"checkpoint {ckpt_path!r} was trained with {section}.enabled="
                                  f"{str(saved[section]['enabled']).lower()}; resuming with "
                                  f"{str(cfg[section]['enabled']).lower()} ({source}) is not supported")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "backends":
            for name, why in available_backends().items():
                print(f"{name:10s} {'ok' if why is None else 'unusable: ' + why}")
            return 0
        config = _train_config(args)
        from .report import format_summary
        summary = train(config, args.out, resume=args.resume, progress=not args.no_progress)
        print(format_summary(summary))
        return 0
    except USER_ERRORS as exc:
        print(f"refimpl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("refimpl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
