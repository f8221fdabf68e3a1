"""`refimpl crosscheck`: refimpl as the oracle for PyTorch and DeepSpeed.

    refimpl crosscheck [--config FILE] [--set K=V ...] --against torch|deepspeed [--steps N] [--world-size N]
                       [--fp64-arbiter] [--snapshot-steps LIST] [--out DIR]

refimpl and the peer train from the same step-0 weights on the same global batches, each with the optimizer,
schedule, clipping, precision and ZeRO stage / offload the config says; both record per-step scalars and, at
snapshot steps, every parameter's weight, gradient and Adam moments (trace.py). The comparison (compare.py)
names the first step, quantity and parameter where they differ beyond the error budget of the run's precision,
and diagnose.py what known semantic knob would explain it. With --fp64-arbiter refimpl also trains in float64
from the same weights, and each side's distance from it says whether a difference is rounding or a bug, and
whose. Writes <out>/{refimpl,torch|deepspeed,fp64}/ traces, report.json and crosscheck.png.

Exit status: 0 within budget (or over it where the fp64 arbiter finds both sides equally far from fp64: rounding),
1 a divergence was found, 2 bad input (config, a peer that is not installed, rejects the config or crashes: one
line naming it, with the peer's own last error line).
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

from tqdm import tqdm

from ..config import load_config, merge_layers
from ..train import _swap_paths_in, prepare_out_dir
from .compare import precision
from .torch_side import PeerError

PEERS = ("torch", "deepspeed")

__all__ = ["PEERS", "PeerError", "add_arguments", "run", "crosscheck"]


def add_arguments(p) -> None:
    p.add_argument("--config", metavar="FILE", help="JSON or TOML config (a DeepSpeed config plus model/data)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config value (repeatable)")
    p.add_argument("--against", required=True, choices=PEERS, help="the peer to hold refimpl against")
    p.add_argument("--steps", type=int, default=10, metavar="N", help="optimizer steps (default 10)")
    p.add_argument("--world-size", type=int, metavar="N", help="data-parallel ranks (both sides)")
    p.add_argument("--fp64-arbiter", action="store_true", help="also train refimpl in float64 and say which "
                                                               "side is further from it")
    p.add_argument("--snapshot-steps", metavar="LIST", help="steps at which every parameter is compared: "
                   "'all' or a comma list (default: all steps up to 10, else 1-5 and the quartiles)")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/crosscheck-<timestamp>/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def snapshot_steps(spec: str | None, steps: int) -> list[int]:
    if spec is None:
        picks = range(1, steps + 1) if steps <= 10 else {1, 2, 3, 4, 5, steps // 4, steps // 2, 3 * steps // 4, steps}
        return sorted(picks)
    if spec == "all":
        return list(range(1, steps + 1))
    try:
        picks = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise PeerError(f"--snapshot-steps {spec!r}: expected 'all' or a comma list of steps like 1,5,10") from None
    bad = [k for k in picks if not 1 <= k <= steps]
    if bad:
        raise PeerError(f"--snapshot-steps {spec!r}: steps {bad} are outside 1..{steps}")
    return picks


def run(args) -> int:
    """The command (cli.py hands it the parsed arguments); returns the exit status."""
    overrides = list(args.overrides) + [f"run.steps={args.steps}"]
    if args.world_size is not None:
        overrides.append(f"world_size={args.world_size}")
    if args.steps < 1:
        raise PeerError(f"--steps must be >= 1, got {args.steps}")
    config = load_config(args.config, overrides)
    raw = merge_layers(args.config, overrides)
    out = Path(args.out or Path("runs") / datetime.now().strftime("crosscheck-%Y%m%d-%H%M%S-%f"))
    report = crosscheck(config, raw, args.against, args.steps, snapshot_steps(args.snapshot_steps, args.steps),
                        out, fp64=args.fp64_arbiter, progress=not args.no_progress)
    from .report import table
    print(table(report))
    print(f"wrote {out / 'report.json'} and {out / 'crosscheck.png'}")
    return 1 if report["divergence"] else 0


def crosscheck(config: dict, raw: dict, against: str, steps: int, snaps, out, *, fp64=False,
               progress=True) -> dict:
    """Run refimpl and the peer (and the fp64 reference); compare; write the traces, report.json and the plot."""
    from .refimpl_side import fp64_config, initial_weights, run_refimpl
    from .report import build_report, plot, write_json
    prec = precision(config)
    if against == "deepspeed" and prec == "fp64":
        raise PeerError("DeepSpeed does not train in float64; compare an fp32/fp16/bf16 run and add --fp64-arbiter")
    _check_peer_installed(against)
    out = prepare_out_dir(out)
    bar = tqdm(total=steps * (3 if fp64 else 2), desc="crosscheck", unit="step", disable=not progress,
               dynamic_ncols=True)

    def tick(name):
        bar.set_postfix_str(name)
        bar.update(1)
    weights = initial_weights(config)
    ours = run_refimpl(_swap_paths_in(config, out / "refimpl"), steps, snaps, progress=tick)
    ours.write(out / "refimpl")
    if against == "torch":
        from .torch_side import run_torch
        theirs = run_torch(config, steps, snaps, weights, progress=tick)
        theirs.write(out / "torch")
    else:
        from .deepspeed_side import run_deepspeed
        theirs = run_deepspeed(config, raw, steps, snaps, weights, out, progress=tick)
    reference = None
    if fp64:
        reference = run_refimpl(_swap_paths_in(fp64_config(config), out / "fp64"), steps, snaps, "fp64",
                                force_skips=ours.skipped_steps(), initial=weights, progress=tick)
        reference.write(out / "fp64")
    bar.close()

    report, arbiter_series, diffs = build_report(config, against, steps, snaps, weights, ours, theirs, reference)
    write_json(report, out / "report.json")
    plot(diffs, report, out / "crosscheck.png", arbiter_series)
    return report


def _check_peer_installed(against: str) -> None:
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        raise PeerError(f"--against {against} needs PyTorch: pip install -e \".[crosscheck]\" (on machines that "
                        f"carry the CPU wheel: pip install torch==2.13.0)")
    if against == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise PeerError("--against deepspeed needs DeepSpeed: pip install -e \".[crosscheck]\"")
