"""Scale: one full training step of a model whose model states are at least twice this machine's RAM.

ZeRO-Infinity §5 and Fig. 1: with the parameters and the optimizer states in the NVMe tier, what bounds the model a
node can train is its NVMe capacity, not its memory. The issue's target on a 24 GiB, 2-core machine: one full
training step (forward, backward, AdamW) of a model of >= 3B parameters, whose 16 bytes per parameter (fp16/bf16
parameters and gradients, fp32 master and Adam moments: 48 GB) are more than twice the RAM, with peak RSS reported.

What makes it possible (each is the code path every stage-3 run takes, not a special case for this script):
- zero.Init (refimpl/zero/init.py): the model is built deferred and drawn one parameter at a time; the parameter's
  bf16 chunk goes to the NVMe parameter store, its fp32 copy to the optimizer's NVMe sub-groups.
- forward/backward fetch each parameter from NVMe just before its module runs and drop it after
  (refimpl/zero/stage3.py, refimpl/memory/param_offload.py); gradients are reduced into a bf16 partition.
- the optimizer streams sub-groups nvme -> host -> nvme, upcasting the gradient and writing the new bf16
  parameters back per sub-group (refimpl/memory/optimizer_offload.py): no fp32 copy of the whole partition.
So host memory holds the bf16 gradient partition (2 bytes per parameter) plus buffers.

    python3 benchmarks/scale_step.py [--params 3.3e9 | --fill 0.6] [--d-model 2560] [--path DIR] [--keep] [--out table.md]
        [--set backend=cupy zero_optimization.offload_optimizer.device=cpu ...]   (any config override)

With ``--set zero_optimization.offload_optimizer.ratio=R memory.device_bytes=...`` (Twin-Flow) the first
int((1 - R) * n) optimizer sub-groups stay on the device: device, host and disk hold the model states together.

The table ends with the model as a fraction of what the tiers (GPU memory, RAM, the free space on the disk of
--path) hold at 16 bytes per parameter. It needs about 14.2 bytes per parameter free on the filesystem of --path (2 with the optimizer in host memory;
default: a folder in the current directory) and deletes the swap files afterwards unless --keep.
"""
import argparse
import math
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _report import emit, filesystem  # noqa: E402  (benchmarks/ is the script's folder)
from refimpl.backend import use_backend  # noqa: E402
from refimpl.config import load_config  # noqa: E402
from refimpl.engine import Engine  # noqa: E402
from refimpl.train import build  # noqa: E402

GiB = 1 << 30


def mem_total() -> int:
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024


def vm_hwm() -> int:
    """Peak resident set size of this process so far (bytes)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024


def du(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def gpu_bytes(be) -> int:
    """The GPU's memory (0 on CPU backends: the 'device' is host memory, counted once)."""
    if not be.is_gpu:
        return 0
    import cupy
    return int(cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["totalGlobalMem"])


def layers_for(params: float, d: int, vocab: int, seq: int, at_least: bool = False) -> int:
    """The layers that come nearest to `params` (``at_least``: the fewest that reach it)."""
    per_layer = 12 * d * d + 13 * d                    # q, k, v, out (4 d^2 + 4d), MLP (8 d^2 + 5d), 2 LayerNorms
    embeddings = (vocab + seq) * d + vocab * d + 2 * d  # tok_emb, pos_emb, lm_head, ln_f
    layers = (params - embeddings) / per_layer
    return max(1, math.ceil(layers) if at_least else round(layers))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=3.3e9, help="target parameter count (layers are derived)")
    ap.add_argument("--fill", type=float, default=None,
                    help="instead of --params: this fraction of what device + host + the disk of --path hold at 16 "
                         "bytes per parameter (ZeRO-Infinity's capacity claim; e.g. 0.6)")
    ap.add_argument("--d-model", type=int, default=2560)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sub-group-size", type=float, default=5e7, help="optimizer sub-group (elements)")
    ap.add_argument("--path", default=None, help="folder for the swap files (default: a new folder in the cwd)")
    ap.add_argument("--keep", action="store_true", help="keep the swap files")
    ap.add_argument("--set", nargs="*", default=[], help="more config overrides KEY=VALUE")
    ap.add_argument("--ram-gib", type=float, default=None,
                    help="the machine's RAM for the ratios (default: MemTotal, which some VMs grow on demand)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    vocab = 256                                         # the byte-level LM's vocabulary
    if args.path:
        os.makedirs(args.path, exist_ok=True)
    swap = tempfile.mkdtemp(prefix="scale-swap-", dir=args.path or os.getcwd())
    if args.fill is not None:                           # the tiers as one pool: size the model to fill a share
        from refimpl.backend import get_backend
        name = next((o.split("=", 1)[1] for o in args.set if o.startswith("backend=")), None)
        ram = int(args.ram_gib * GiB) if args.ram_gib else mem_total()
        pool = gpu_bytes(get_backend(name)) + ram + shutil.disk_usage(swap).free
        args.params = args.fill * pool / 16
    n_layers = layers_for(args.params, args.d_model, vocab, args.seq, at_least=args.fill is not None)
    try:
        overrides = [
            f"model.d_model={args.d_model}", f"model.n_heads={args.heads}", f"model.n_layers={n_layers}",
            f"model.max_seq_len={args.seq}", f"data.seq_len={args.seq}", f"train_micro_batch_size_per_gpu={args.batch}",
            "bf16.enabled=true", "scheduler=null", "gradient_clipping=1.0",
            "zero_optimization.stage=3", "zero_optimization.offload_param.device=nvme",
            f"zero_optimization.offload_param.nvme_path={swap}", "zero_optimization.offload_optimizer.device=nvme",
            f"zero_optimization.offload_optimizer.nvme_path={swap}",
            f"zero_optimization.sub_group_size={args.sub_group_size:g}", "zero_optimization.reduce_bucket_size=5e7",
            "memory.device_bytes=1GB", *args.set]
        cfg = load_config(overrides=overrides)
        ram = int(args.ram_gib * GiB) if args.ram_gib else mem_total()
        times, hwm = {}, {}
        t = time.perf_counter()
        be, dataset, model = build(cfg)                 # stage 3: built inside zero.Init, nothing drawn yet
        psi = model.num_parameters()
        zcfg = cfg["zero_optimization"]
        on_disk_per_param = (2 if zcfg["offload_param"]["device"] == "nvme" else 0) + \
                            (12 if zcfg["offload_optimizer"]["device"] == "nvme" else 0)
        need, free = int((on_disk_per_param + 0.2) * psi), shutil.disk_usage(swap).free  # free: the disk tier
        if need > free:
            raise SystemExit(f"--path {swap}: the swap files need about {need / 1e9:.1f} GB, "
                             f"the filesystem has {free / 1e9:.1f} GB free; use --path on a larger disk or fewer --params")
        print(f"{psi / 1e9:.2f}B parameters ({n_layers} layers of d_model {args.d_model}); model states "
              f"16 x {psi / 1e9:.2f}B = {16 * psi / GiB:.1f} GiB, RAM {ram / GiB:.1f} GiB; swap in {swap}",
              flush=True)
        with use_backend(be):
            engine = Engine(model, cfg, be, progress=True)   # draws, partitions and writes every parameter
            times["zero.Init + states into their tiers"], hwm["init"] = time.perf_counter() - t, vm_hwm()
            on_disk = du(swap)
            batch = dataset.get_batch("train", 0, args.batch, args.seq)
            t = time.perf_counter()
            loss, _ = model.loss(batch)
            be.synchronize()                            # GPU: the phase's kernels have run
            times["forward"], t = time.perf_counter() - t, time.perf_counter()
            engine.backward(loss)
            be.synchronize()
            times["backward"], t = time.perf_counter() - t, time.perf_counter()
            applied = engine.step()
            be.synchronize()
            times["optimizer step"] = time.perf_counter() - t
            hwm["step"] = vm_hwm()
        ledger = engine.ledger
        ledger.flush()                                  # device-timed host<->device copies join the ledger
        moved = {}
        for e in ledger.events:
            if e["kind"] == "transfer":
                moved[(e["src"], e["dst"])] = moved.get((e["src"], e["dst"]), 0) + e["nbytes"]
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        gpu = gpu_bytes(be)
        tiers = gpu + ram + free        # what device, host and (free) disk hold, at 16 B/param
        lines = [
            "| parameters | layers x d_model | model states (16 B/param) | / RAM | on NVMe | peak RSS: init | "
            "peak RSS: step | peak RSS / RAM | loss | step applied | tiers hold (16 B/param) | fraction |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {psi / 1e9:.2f}B | {n_layers} x {args.d_model} | {16 * psi / GiB:.1f} GiB | {16 * psi / ram:.2f} | "
            f"{on_disk / GiB:.1f} GiB | {hwm['init'] / GiB:.2f} GiB | {hwm['step'] / GiB:.2f} GiB | "
            f"{max(ru, hwm['step']) / ram:.2f} | {float(be.to_numpy(loss.data)):.4f} | {applied} | "
            f"{tiers / 16 / 1e9:.1f}B | {16 * psi / tiers:.2f} |",
            "",
            "| phase | seconds |", "|---|---|",
            *[f"| {k} | {v:.1f} |" for k, v in times.items()],
            "",
            "| tier pair | GB moved (whole run) |", "|---|---|",
            *[f"| {s} -> {d} | {b / 1e9:.1f} |" for (s, d), b in sorted(moved.items())],
            "",
            "| tier | GB held at most (the ledger's byte budget) | GB the tier has |", "|---|---|---|",
            *[f"| {tier} | {ledger.budget.peak[tier] / 1e9:.1f} | {cap / 1e9:.1f} |"
              for tier, cap in (("device", gpu), ("host", ram), ("nvme", free)) if tier in ledger.budget.peak],
        ]
        emit(lines, f"backend {be.name}; NVMe tier on {filesystem(swap)}; tiers: device {gpu / 1e9:.0f} GB, host "
                    f"{ram / GiB:.0f} GiB, disk {free / GiB:.0f} GiB free; bf16, ZeRO stage 3, "
                    f"1 rank, {args.batch} x {args.seq} tokens, sub_group_size {args.sub_group_size:g}; offload_param "
                    f"{zcfg['offload_param']['device']}, offload_optimizer {zcfg['offload_optimizer']['device']}",
             __file__, args.out)
    finally:
        if not args.keep:
            shutil.rmtree(swap, ignore_errors=True)


if __name__ == "__main__":
    main()
