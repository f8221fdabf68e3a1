"""Offload overlap: ZeRO-3 step time with parameters and optimizer states on NVMe against all in memory, same run.

ZeRO-Infinity §6.2 (overlap-centric design) claims that moving model states between NVMe, host and device costs
little once compute dominates, because the transfers hide under it. The issue's target: step time with
``offload_param`` and ``offload_optimizer`` on NVMe at most 1.25x the step time with both ``none``, at a size
where compute dominates. The peer is the *same* model and config in memory (offload none/none, DeepSpeed's
defaults). The variants, each its own Engine in this one process, stepped interleaved (A B C, C B A, ...) on the
same batches so that machine drift and other tenants hit every variant alike:

    none           offload none/none                         the peer
    nvme           offload nvme/nvme, DeepSpeed's defaults    (sub_group_size 1e9, buffer_count 5, ...)
    nvme tuned     offload nvme/nvme with the --tuned knobs   (default: TUNED below, which says why)
    cpu            offload cpu/cpu (with --cpu)
    cpu sync       offload cpu/cpu with synchronous host<->device copies (with --sync-copies; GPU backends copy
                   on a stream of their own otherwise: refimpl/memory/transfer.py)

All run ZeRO stage 3 with ``stage3_param_persistence_threshold=0``, so every parameter crosses the tiers. The first
table gives the median step time (min-max), its ratio to ``none`` (ratio of medians, and the median of the ratios
of steps of the same round, which were nearest in time), the split into forward+backward and optimizer step, and
per NVMe direction: MB per step, the disk's GB/s over the time the NVMe store had I/O in flight, and the seconds the
compute thread was blocked (exposed, from the ledger's waits; refimpl/memory/ledger.py). The second table splits
each NVMe variant's exposed seconds by what waited, with counts and transfer sizes: where the time goes. The third
gives the host<->device copies of the offloaded variants per step: bytes, GB/s, and the ledger's hidden and exposed
seconds (on a GPU, device time: what the compute stream lost waiting for a copy is exposed, the rest ran beside it).

    python3 benchmarks/offload_overlap.py [--dtype fp32 bf16] [--steps 6] [--path DIR] [--cpu] [--out table.md]
        [--set KEY=VALUE ...]        config override for every variant (model size, ...)
        [--nvme-set KEY=VALUE ...]   for the offloaded variants only (aio.*: the in-memory peer doesn't read them)
        [--tuned KEY=VALUE ...]      the tuned variant's knobs (replace TUNED; --tuned alone: no tuned variant)
        [--world-size 2]             simulated ranks (threads; on 2 cores they oversubscribe, steps get slow)
        [--sync-copies]              also offload cpu/cpu with synchronous host<->device copies
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _report import emit, filesystem, median_range  # noqa: E402  (benchmarks/ is the script's folder)
from refimpl.backend import use_backend  # noqa: E402
from refimpl.comm.local import run_ranks  # noqa: E402
from refimpl.config import load_config  # noqa: E402
from refimpl.engine import Engine  # noqa: E402
from refimpl.memory.ledger import Ledger  # noqa: E402
from refimpl.train import build, rank_slice  # noqa: E402

# A size where compute dominates on a 2-core machine: 4 blocks of d_model 768 (28.9M parameters), 8 x 256 tokens;
# about 3.5 s per fp32 step in memory. Every key is an ordinary config override, so --set can change any of it.
MODEL = ["model.d_model=768", "model.n_heads=12", "model.n_layers=4", "model.max_seq_len=256", "data.seq_len=256",
         "train_micro_batch_size_per_gpu=8"]
BASE = ["zero_optimization.stage=3", "zero_optimization.stage3_param_persistence_threshold=0", "scheduler=null"]
# The best knobs found on a 2-core machine with a virtual disk (fp32 1.40x -> 1.05-1.15x, bf16 1.25x -> 1.00x):
# - sub_group_size 4e6: 8 sub-groups, so optimizer reads and writes pipeline under the Adam of the neighbours (the
#   default 1e9 is one sub-group: read all, compute, write all, nothing to overlap with);
# - offload_param.buffer_count 16: room for the read-ahead of modules i+2, i+3 *and* the module being fetched (with
#   5, the fetch finds the pool full and ParamSwapper.to_device drains and discards every read issued ahead);
# - stage3_prefetch_bucket_size 0: no all-gather prefetch, which would run ahead of the NVMe read-ahead and read each
#   chunk synchronously (the all-gather calls ParamSwapper.to_device at issue). With one rank it is a copy anyway.
TUNED = ["zero_optimization.sub_group_size=4e6", "zero_optimization.offload_param.buffer_count=16",
         "zero_optimization.stage3_prefetch_bucket_size=0"]
DTYPES = {"fp32": [], "bf16": ["bf16.enabled=true"]}


def variant_config(device, dtype, world_size, swap, common, offload_only=(), knobs=()):
    sets = [*BASE, *MODEL, f"world_size={world_size}", *DTYPES[dtype], *common]
    if device != "none":
        path = f',"nvme_path":"{swap}"' if device == "nvme" else ""
        sets += [f'zero_optimization.offload_param={{"device":"{device}"{path}}}',
                 f'zero_optimization.offload_optimizer={{"device":"{device}"{path}}}', *offload_only, *knobs]
    return load_config(None, sets)


def stores(engine):
    """The NVMe stores of an Engine (parameters, optimizer states); none when nothing is on NVMe."""
    found = [getattr(engine.optimizer, "store", None), getattr(engine.zero.swapper, "store", None)]
    return [s for s in found if s is not None and s.tier == "nvme"]


def io_totals(engine):
    """(bytes read, read busy s, bytes written, write busy s) summed over the Engine's stores so far."""
    st = [s.stats for s in stores(engine)]
    return np.array([sum(s.bytes_read for s in st), sum(s.read_seconds for s in st),
                     sum(s.bytes_written for s in st), sum(s.write_seconds for s in st)])


def category(event, phase):
    """What a wait or transfer was for, from its tier pair and label (the labels refimpl's offload code writes)."""
    pair, label = f"{event['src']}->{event['dst']}", event.get("label", "")
    if label.startswith("optimizer sub-group"):
        return f"{pair} optimizer sub-groups"
    if label == "parameter partition" or label.startswith("parameters of sub-group"):
        return f"{pair} parameter write-back"
    if label.startswith("reduced gradient"):
        return f"{pair} reduced gradients"
    if pair in ("nvme->host", "host->device") and phase == "fb":
        return f"{pair} parameter chunks (forward+backward)"
    return f"{pair} {label or 'other'} ({'forward+backward' if phase == 'fb' else 'optimizer step'})"


def _rank(comm, configs, warmup, steps, bar):
    """Every rank: build one Engine per variant, then step them interleaved. Rank 0 returns its records."""
    engines = {}
    for name, cfg in configs.items():
        be, dataset, model = build(cfg)
        with use_backend(be):
            if name.endswith("sync"):      # the copy stream reads the flag once, when the engine is built
                be.async_copies = False
            try:
                engines[name] = (cfg, be, dataset, model, Engine(model, cfg, be, comm))
            finally:
                vars(be).pop("async_copies", None)
    records = {name: [] for name in configs}
    order = list(configs)
    try:
        for rnd in range(warmup + steps):
            for name in (order if rnd % 2 == 0 else order[::-1]):   # A B C, C B A: none is always first
                cfg, be, dataset, model, engine = engines[name]
                micro, T, N = cfg["train_micro_batch_size_per_gpu"], cfg["data"]["seq_len"], comm.world_size
                batch = rank_slice(dataset.get_batch("train", rnd, micro * N, T), comm.rank, N)  # same data for all
                io0 = io_totals(engine)
                comm.barrier()
                with use_backend(be):
                    t0 = time.perf_counter()
                    with engine.ledger.compute("forward+backward", on_device=True):
                        loss, _ = model.loss(batch)
                        engine.backward(loss)
                        be.synchronize()           # GPU: the kernels queued so far have run
                    t1 = time.perf_counter()
                    engine.step()
                    be.synchronize()
                    comm.barrier()                 # a step ends when the slowest rank's does
                    t2 = time.perf_counter()
                led = engine.ledger
                led.flush()                        # device-timed copies join the ledger
                if rnd >= warmup and comm.rank == 0:
                    events = [e for e in led.events if e["step"] == led.step]
                    records[name].append({"step_s": t2 - t0, "fb_s": t1 - t0, "opt_s": t2 - t1, "events": events,
                                          "split": t1 - led.t0,   # end of forward+backward on the ledger's clock
                                          "io": io_totals(engine) - io0})
                led.next_step()
                if comm.rank == 0 and bar is not None:
                    bar.update(1)
    finally:
        for *_, engine in engines.values():
            for store in stores(engine):
                store.close()
    return records



def exposed_s(recs, src, dst):
    """Median over steps of the seconds the compute thread waited on src->dst transfers."""
    return float(np.median([sum(e["end"] - e["start"] for e in r["events"]
                                if e["kind"] == "wait" and e["src"] == src and e["dst"] == dst) for r in recs]))


def io_cells(recs, direction):
    """MB per step, disk GB/s (bytes over the store's busy seconds), exposed s per step for one NVMe direction."""
    col = 0 if direction == "read" else 2             # io_totals: bytes at col, busy seconds at col + 1
    io = np.array([r["io"] for r in recs])            # (steps, 4)
    nbytes, busy = io[:, col], io[:, col + 1]
    if not nbytes.any():
        return ["-", "-", "-"]
    src, dst = ("nvme", "host") if direction == "read" else ("host", "nvme")
    return [f"{np.median(nbytes) / 1e6:,.0f}", f"{nbytes.sum() / busy.sum() / 1e9:.2f}",
            f"{exposed_s(recs, src, dst):.2f}"]


def exposed_breakdown(recs):
    """Per category: waits, exposed s, transfers per step, and one transfer's size (KB, median / max)."""
    acc = defaultdict(lambda: {"waits": 0, "exposed": 0.0, "transfers": 0, "sizes": []})
    for r in recs:
        for e in r["events"]:
            if e["kind"] not in ("wait", "transfer"):
                continue
            c = acc[category(e, "fb" if e["start"] < r["split"] else "opt")]
            if e["kind"] == "wait":
                c["waits"] += 1
                c["exposed"] += e["end"] - e["start"]
            else:
                c["transfers"] += 1
                c["sizes"].append(e["nbytes"])
    n = len(recs)
    return {k: (v["waits"] / n, v["exposed"] / n, v["transfers"] / n,
                f"{np.median(v['sizes']) / 1e3:,.0f} / {max(v['sizes']) / 1e3:,.0f}" if v["sizes"] else "-")
            for k, v in sorted(acc.items())}


def copy_cells(recs):
    """host->device and device->host per step: MB, GB/s, hidden s, exposed s (medians; Ledger.summary's terms)."""
    per_pair = defaultdict(list)
    for r in recs:
        led = Ledger()
        led.events = r["events"]
        for pair, p in led.summary()["pairs"].items():
            if "device" in pair:
                per_pair[pair].append((p["bytes"] / 1e6, p["GB_per_s"] or 0.0, p["hidden_s"], p["exposed_s"]))
    out = {}
    for pair, rows in sorted(per_pair.items()):
        mb, gbs, hidden, exposed = np.median(np.array(rows), axis=0)
        out[pair] = (mb, f"{gbs:.2f}", hidden, exposed)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp32"], help="parameter dtypes (fp32)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant (default 6)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2; the first "
                                                          "records the prefetch trace)")
    ap.add_argument("--world-size", type=int, default=1, help="simulated ranks (threads; default 1)")
    ap.add_argument("--cpu", action="store_true", help="also run offload cpu/cpu")
    ap.add_argument("--sync-copies", action="store_true", help="also run offload cpu/cpu with synchronous "
                                                               "host<->device copies")
    ap.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every variant (e.g. model.d_model=1024)")
    ap.add_argument("--nvme-set", dest="offload_only", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the offloaded variants only (e.g. aio.queue_depth=16)")
    ap.add_argument("--tuned", nargs="*", default=None, metavar="KEY=VALUE",
                    help=f"the tuned nvme variant's knobs (default: {' '.join(TUNED)}); no values: no tuned variant")
    ap.add_argument("--path", default=".", help="a folder on the filesystem for the NVMe tier (default: current)")
    ap.add_argument("--out", help="also write the Markdown tables to this file")
    args = ap.parse_args(argv)
    tuned = TUNED if args.tuned is None else args.tuned
    variants = {"none": ("none", []), "nvme": ("nvme", [])}
    if tuned:
        variants["nvme tuned"] = ("nvme", tuned)
    if args.cpu or args.sync_copies:
        variants["cpu"] = ("cpu", [])
    if args.sync_copies:
        variants["cpu sync"] = ("cpu", [])

    swap = tempfile.mkdtemp(prefix="offload-overlap-", dir=args.path)
    results, first_cfg = {}, None
    try:
        total = len(args.dtype) * len(variants) * (args.warmup + args.steps)
        with tqdm(total=total, desc="offload overlap", unit="step", file=sys.stderr) as bar:
            for dtype in args.dtype:
                configs = {name: variant_config(dev, dtype, args.world_size, os.path.join(swap, dtype, str(i)),
                                                args.common, args.offload_only, knobs)
                           for i, (name, (dev, knobs)) in enumerate(variants.items())}
                first_cfg = first_cfg or configs["nvme"]
                results[dtype] = run_ranks(args.world_size, _rank, configs, args.warmup, args.steps, bar,
                                           timeout=configs["nvme"]["run"]["comm_timeout"])[0]
    finally:
        shutil.rmtree(swap, ignore_errors=True)

    lines = ["| dtype | offload | step s, median (min-max) | / none | / none, paired | fwd+bwd s | optimizer s "
             "| nvme->host MB/step | disk read GB/s | read exposed s | host->nvme MB/step | disk write GB/s "
             "| write exposed s | host->device exposed s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for dtype, per in results.items():
        base = [r["step_s"] for r in per["none"]]
        for name, recs in per.items():
            step = [r["step_s"] for r in recs]
            paired = np.median([a / b for a, b in zip(step, base)])   # the same round: the nearest in time
            cells = [*io_cells(recs, "read"), *io_cells(recs, "write")]
            lines.append(f"| {dtype} | {name} | {median_range(step, 2)} | **{np.median(step) / np.median(base):.2f}** "
                         f"| {paired:.2f} | {np.median([r['fb_s'] for r in recs]):.2f} "
                         f"| {np.median([r['opt_s'] for r in recs]):.2f} | {' | '.join(cells)} "
                         f"| {exposed_s(recs, 'host', 'device'):.2f} |")
    lines += ["", "Exposed (waited-for) time of the NVMe variants, by what waited, per step; sizes are one transfer's:",
              "", "| dtype | offload | what | waits | exposed s | transfers | KB per transfer, median / max |",
              "|---|---|---|---|---|---|---|"]
    for dtype, per in results.items():
        for name in (n for n, (dev, _) in variants.items() if dev == "nvme"):
            for what, (waits, exposed, transfers, kb) in exposed_breakdown(per[name]).items():
                lines.append(f"| {dtype} | {name} | {what} | {waits:g} | {exposed:.3f} | {transfers:g} | {kb} |")

    lines += ["", "Host<->device copies of the offloaded variants, per step (ledger; on a GPU, device time):", "",
              "| dtype | offload | copy | MB/step | GB/s | hidden s | exposed s |", "|---|---|---|---|---|---|---|"]
    for dtype, per in results.items():
        for name in (n for n, (dev, _) in variants.items() if dev != "none"):
            for pair, c in copy_cells(per[name]).items():
                lines.append(f"| {dtype} | {name} | {pair} | {c[0]:,.1f} | {c[1]} | {c[2]:.4f} | {c[3]:.4f} |")

    m = first_cfg["model"]
    n_params = sum(p.size for p in build(first_cfg)[2].parameters())
    details = (f"NVMe tier on {filesystem(args.path)}; model {m['n_layers']} x d_model {m['d_model']} ({n_params / 1e6:.1f}M "
               f"parameters), {first_cfg['train_micro_batch_size_per_gpu']} x {first_cfg['data']['seq_len']} tokens "
               f"per rank, world_size {first_cfg['world_size']}, ZeRO stage 3, persistence threshold 0; "
               f"nvme tuned: {' '.join(k.split('.')[-1] for k in tuned) or '-'}; {args.warmup} warm-up + "
               f"{args.steps} timed steps per variant, interleaved")
    emit(lines, details, __file__, args.out)


if __name__ == "__main__":
    main()
