"""ZeRO-Infinity's offload path on one GPU: refimpl against DeepSpeed, against the CPU's memory and the disk.

    python3 benchmarks/gpu.py offload [--variants none opt params+opt twin nvme] [--batch 8] [--seq 1024]
        [--layers 12] [--d-model 768] [--heads 12] [--steps 6] [--block N] [--warmup 2] [--path DIR]
        [--no-peer] [--peer-variants ...] [--peer-timeout S] [--host-profile VARIANT] [--timeline FILE]
        [--backend cupy] [--set KEY=VALUE ...] [--out FILE]

Every variant is ZeRO stage 3 on one rank, bf16 mixed precision, the same model drawn from the same seed:

    none         nothing offloaded (the in-memory peer)
    opt          offload_optimizer cpu             (ZeRO-Offload: fp32 master and moments, Adam on the host)
    params+opt   offload_param cpu + offload_optimizer cpu
    twin         params+opt with offload_optimizer.ratio 0.5 and sub_group_size 2e7 (Twin-Flow: half the
                 sub-groups' states and update stay on the device)
    nvme         offload_param nvme + offload_optimizer nvme under --path (ZeRO-Infinity)

A variant may carry its own config overrides and the overlapped host update's piece: "opt/piece=0" (whole
sub-groups), "opt/pieces=0" (pieces of OVERLAP_PIECE however many), "opt/lanes=0" (one worker thread instead of
numba's lanes), "twin/zero_optimization.sub_group_size=5e7".
DeepSpeed runs each base variant once.

refimpl's variants are Engines in this process, on the same batches, in blocks of consecutive steps interleaved
(A B C, C B A): a step's time is its block's time over its steps, the block ending when its last host update has
landed (an update may overlap the next step's forward, never another variant's). That charges each block one
update that nothing hid, so it overstates an overlapped variant's step by up to an update over --block. The
steady step is what a long run sees: the time from one step's start to the next one's, from a block's second
step on (the first starts with no update in flight), so --block 3 or more.
DeepSpeed 0.19.8 (benchmarks/_deepspeed_offload.py; install it on the GPU machine with
benchmarks/install_deepspeed_peer.sh) runs the same variants in a process of its own, on the same step-0
weights and batches, with the DeepSpeed config refimpl's config translates to (the cross-check's).

Tables: (1) step time per variant (median, min-max), forward+backward and optimizer step, against refimpl's
in-memory step and against DeepSpeed's; (2) the host AdamW: its seconds per step (the ledger's "adam sub-group"
compute events), the bytes it moves (param, both moments read and written, the gradient read and the
low-precision copy written), its GB/s, and that against an in-place numba triad (a = a + s*c, 12 B/element)
measured in this run with the same number of elements; (3) for nvme: the bytes the step moved between host and
disk, against dd O_DIRECT measured in this run (the disk roofline: read bytes / dd read + written / dd write).
"""
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import emit, median_range  # noqa: E402
from refimpl.backend import use_backend  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu.py")   # how it is run

VARIANTS = {
    "none": [],
    "opt": ['zero_optimization.offload_optimizer={"device":"cpu","pin_memory":true}'],
    "params+opt": ['zero_optimization.offload_param={"device":"cpu","pin_memory":true}',
                   'zero_optimization.offload_optimizer={"device":"cpu","pin_memory":true}'],
    "twin": ['zero_optimization.offload_param={"device":"cpu","pin_memory":true}',
             'zero_optimization.offload_optimizer={"device":"cpu","pin_memory":true,"ratio":0.5}',
             "zero_optimization.sub_group_size=20000000"],
    "nvme": ['zero_optimization.offload_param={"device":"nvme","nvme_path":"{path}"}',
             'zero_optimization.offload_optimizer={"device":"nvme","nvme_path":"{path}"}'],
}


def base_sets(args) -> list:
    return [f"backend={args.backend}", "world_size=1", "zero_optimization.stage=3",
            "zero_optimization.offload_param=null", "zero_optimization.offload_optimizer=null",
            "memory.device_bytes=null", "memory.host_bytes=null", "bf16.enabled=true", "scheduler=null",
            "gradient_clipping=1.0", "model.vocab_size=50257", f"model.n_layers={args.layers}",
            f"model.d_model={args.d_model}", f"model.n_heads={args.heads}", f"model.max_seq_len={args.seq}",
            f"data.seq_len={args.seq}", "model.tie_embeddings=false",   # (stage 3 unties, on both sides)
            f"train_micro_batch_size_per_gpu={args.batch}", *args.set]


PIECE_KEYS = {"piece": "overlap_piece", "pieces": "overlap_pieces",   # variant option -> OffloadedAdamW attribute
              "lanes": "overlap_lanes"}
HOST_KEYS = ("threads", "chunk")    # the host AdamW's numba threads and parallel chunk size (0: static split)


def parse_variant(spec):
    """"opt" or "opt/KEY=VALUE/...": a named variant with config overrides of its own; "piece=N" sets the overlapped
    host update's piece (OffloadedAdamW.overlap_piece; 0: whole sub-groups), "pieces=N" the most pieces
    (overlap_pieces; 0: no bound), "lanes=N" its lanes (overlap_lanes; 0: one worker thread calling the parallel
    kernel), "threads=N" and "chunk=N" the numba threads and `set_parallel_chunksize` of that worker's calls
    (thread-local: set on the thread that runs it). Returns (name, overrides, {key: value})."""
    base, *sets = spec.split("/")
    if base not in VARIANTS:
        raise SystemExit(f"unknown variant {base!r} in {spec!r}; choose from {list(VARIANTS)}")
    ours = (*PIECE_KEYS, *HOST_KEYS)
    attrs = {PIECE_KEYS.get(k, k): int(float(v)) for k, v in (e.split("=", 1) for e in sets) if k in ours}
    return base, [e for e in sets if e.split("=", 1)[0] not in ours], attrs


def variant_config(args, name, swap):
    from refimpl.config import load_config
    base, sets, _ = parse_variant(name)
    return load_config(None, base_sets(args) + [s.replace("{path}", swap) for s in VARIANTS[base]] + sets)


def numba_settings(adam_step, threads=None, chunk=None):
    """adam_step run with these numba settings (thread-local: set on the calling thread, then restored)."""
    import numba

    def run(*a, **kw):
        saved = numba.get_num_threads()
        numba.set_num_threads(threads or saved)
        saved_chunk = numba.set_parallel_chunksize(chunk if chunk is not None else numba.get_parallel_chunksize())
        try:
            return adam_step(*a, **kw)
        finally:
            numba.set_num_threads(saved)
            numba.set_parallel_chunksize(saved_chunk)
    return run


def nvme_stores(engine):
    found = [getattr(engine.optimizer, "store", None), getattr(engine.zero.swapper, "store", None)]
    return [s for s in found if s is not None and s.tier == "nvme"]


def io_totals(engine):
    """(bytes read, bytes written) by the Engine's NVMe stores so far."""
    st = [s.stats for s in nvme_stores(engine)]
    return np.array([sum(s.bytes_read for s in st), sum(s.bytes_written for s in st)], dtype=np.float64)


def adam_seconds(events) -> float:
    return sum(e["end"] - e["start"] for e in events if e["kind"] == "compute"
               and e.get("label", "").startswith("adam sub-group") and not e["label"].endswith("(device)"))


def make_triad(n):
    """The in-place numba triad a = a + s*c over n float32 (what Adam's bandwidth is held against): best seconds."""
    import numba

    @numba.njit(parallel=True, fastmath=False, cache=False)
    def triad_inplace(a, c, s):
        for i in numba.prange(a.size):
            a[i] = a[i] + s * c[i]

    a, c, s = np.ones(n, np.float32), np.ones(n, np.float32), np.float32(1e-3)
    triad_inplace(a, c, s)             # compile and touch every page

    def run(reps=3):
        best = np.inf
        for _ in range(reps):
            t = time.perf_counter()
            triad_inplace(a, c, s)
            best = min(best, time.perf_counter() - t)
        return best
    return run


class Variant:
    def __init__(self, name, config):
        from refimpl.engine import Engine
        from refimpl.train import build
        self.name, self.config = name, config
        self.be, self.dataset, self.model = build(config)
        with use_backend(self.be):
            self.engine = Engine(self.model, config, self.be)
        attrs = parse_variant(name)[2]
        host = {k: attrs.pop(k) for k in HOST_KEYS if k in attrs}
        for attr, value in attrs.items():
            setattr(self.engine.optimizer, attr, value)
        if host:
            self.engine.optimizer.host_adam_step = numba_settings(self.engine.optimizer.host_adam_step, **host)
        self.records = []
        self.blocks = []      # seconds per step of each timed block
        self.steady = []      # seconds from a step's start to the next's, a block's first step left out

    def block(self, batches, keep: bool):
        """Steps one after another, then the last one settled: a host update overlapped with the next forward
        (refimpl/memory/overlapped_update.py) is charged to the block that started it, never to another variant."""
        t0 = time.perf_counter()
        starts = [self.step(batch, keep) for batch in batches]
        if keep:     # step k's start to step k+1's, k >= 2: the wait for step k-1's update and all between
            self.steady.extend(np.diff(starts[1:]).tolist())
        with use_backend(self.be):
            getattr(self.engine.zero, "settle_all", lambda: None)()
            self.be.synchronize()
        if keep:
            self.blocks.append((time.perf_counter() - t0) / len(batches))

    def step(self, batch, keep: bool):
        be, engine = self.be, self.engine
        t_in = time.perf_counter()
        io0 = io_totals(engine)
        with use_backend(be):
            be.synchronize()
            t0 = time.perf_counter()
            loss, _ = self.model.loss(batch)
            engine.backward(loss)
            be.synchronize()
            t1 = time.perf_counter()
            engine.step()
            be.synchronize()
            t2 = time.perf_counter()
            loss = float(loss.item())
        led = engine.ledger
        t3 = time.perf_counter()
        led.flush()
        t4 = time.perf_counter()
        if keep:
            events = [e for e in led.events if e["step"] == led.step]
            # outside t0..t2, still in the block: before t0 (the sync), after t2 (loss.item, the ledger's flush)
            self.records.append({"step_s": t2 - t0, "fb_s": t1 - t0, "opt_s": t2 - t1, "loss": loss,
                                 "adam_s": adam_seconds(events), "io": io_totals(engine) - io0,
                                 "pre_s": t0 - t_in, "item_s": t3 - t2, "flush_s": t4 - t3})
            # the last kept step on the ledger's clock: (entry, step start, end of backward, end of step, after
            # loss.item, after the ledger's flush), its events
            self.timeline = {"marks": [t - led.t0 for t in (t_in, t0, t1, t2, t3, t4)], "events": events}
        led.next_step()
        led.events.clear()
        return t0

    def close(self):
        self.engine.close()


def adam_bytes(engine) -> int:
    """Bytes one host AdamW step moves (Twin-Flow's device sub-groups aside): fp32 param, exp_avg, exp_avg_sq read
    and written, the gradient read, the low-precision copy written."""
    opt = engine.optimizer
    numel = opt.numel - (opt.groups[opt.device_groups - 1][1] if opt.device_groups else 0)   # the host's share
    item = np.dtype(engine.dtype).itemsize
    return numel * (6 * 4 + item + item)


def run(args):
    swap = args.path or tempfile.mkdtemp(prefix="refimpl-offload-")
    variants = {name: Variant(name, variant_config(args, name, os.path.join(swap, name.replace("/", "_"))))
                for name in args.variants}
    first = next(iter(variants.values()))
    n_params = sum(s.numel for s in first.engine.zero.layout.slots)   # (stage 3's model holds only chunks)
    batches = [first.dataset.get_batch("train", s, args.batch, args.seq) for s in range(args.warmup + args.steps)]
    triad = make_triad(first.engine.zero.layout.partition_numel) if any(
        v.engine.zero.cfg.offload_optimizer is not None for v in variants.values()) else None
    triad_s = []
    dd = None
    if "nvme" in variants:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from nvme_bandwidth import measure_dd
        dd = [measure_dd(swap, 1024)]
    weights = None
    if not args.no_peer:
        weights = first.engine.zero.full_state()["master"]   # the step-0 fp32 weights (every variant drew these)
    order = list(variants)
    half = args.block or max(1, args.steps // 2)
    blocks = [(batches[:args.warmup], False)] + [(batches[args.warmup + k:args.warmup + k + half], True)
                                                  for k in range(0, args.steps, half)]
    try:
        for rnd, (block, keep) in enumerate(blocks):    # A B C, C B A: blocks of consecutive steps per variant
            for name in (order if rnd % 2 == 0 else order[::-1]):
                variants[name].block(block, keep)
            if triad is not None:
                triad_s.append(triad())
            print(f"round {rnd + 1}/{len(blocks)} done", file=sys.stderr, flush=True)
        if args.timeline:     # every variant's last timed step, for reading what overlapped what
            import json
            with open(args.timeline, "w") as f:
                json.dump({name: v.timeline for name, v in variants.items()}, f)
        if args.host_profile:
            host_profile(variants[args.host_profile], batches[0])
    finally:
        for v in variants.values():
            v.close()
    if dd is not None:
        dd.append(measure_dd(swap, 1024))
    if weights is not None:    # refimpl's tables first: the peer may fail or run out of time
        report(args, variants, {}, n_params, triad_s, dd, out=None)
    peer = run_peer(args, first.config, weights, swap) if weights is not None else {}
    report(args, variants, peer, n_params, triad_s, dd, out=args.out)


def run_peer(args, config, weights, swap) -> dict:
    try:
        from _deepspeed_offload import run_deepspeed_offload
        names = args.peer_variants or list(dict.fromkeys(v.split("/")[0] for v in args.variants
                                                        if not parse_variant(v)[1]))
        return run_deepspeed_offload(config, weights, names, args.steps,
                                     args.warmup, workdir=tempfile.mkdtemp(prefix="ds-offload-"),
                                     nvme_path=os.path.join(swap, "deepspeed"), timeout=args.peer_timeout)
    except ImportError as exc:
        print(f"DeepSpeed missing ({exc}): refimpl's rows only", file=sys.stderr)
        return {}


def host_profile(variant, batch, top=35):
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2):
        variant.step(batch, keep=False)
    prof.disable()
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof).strip_dirs().sort_stats(key).print_stats(top)


def report(args, variants, peer, n_params, triad_s, dd, out):
    ms = {name: float(np.median(v.blocks)) for name, v in variants.items()}
    base = ms.get("none")
    steady = {name: float(np.median(v.steady)) if v.steady else None for name, v in variants.items()}
    lines = ["| variant | refimpl step ms (blocks) | steady step ms | fwd+bwd ms | optimizer ms "
             "| sync / item / ledger flush ms | / refimpl none | DeepSpeed step ms | DeepSpeed fwd+bwd / optimizer ms "
             "| refimpl / DeepSpeed (blocks, steady) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in variants.items():
        rec = v.records
        row = [name, median_range([1e3 * b for b in v.blocks]),
               median_range([1e3 * b for b in v.steady]) if v.steady else "-",
               f"{1e3 * np.median([r['fb_s'] for r in rec]):.0f}",
               f"{1e3 * np.median([r['opt_s'] for r in rec]):.0f}",
               " / ".join(f"{1e3 * np.median([r[k] for r in rec]):.0f}" for k in ("pre_s", "item_s", "flush_s")),
               f"{ms[name] / base:.2f}" if base else "-"]
        kind, sets, _ = parse_variant(name)
        p = peer.get(name) or (None if sets else peer.get(kind))   # a piece alone: DeepSpeed's same config
        if p and not p.get("error"):
            d = 1e3 * float(np.median(p["step_s"]))
            row += [median_range([1e3 * s for s in p["step_s"]]),
                    f"{1e3 * np.median(p['fb_s']):.0f} / {1e3 * np.median(p['opt_s']):.0f}",
                    f"**{1e3 * ms[name] / d:.2f}**" + (f", **{1e3 * steady[name] / d:.2f}**" if steady[name] else "")]
        else:
            row += [f"failed: {p['error'][:120]}" if p else "-", "-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    losses = {name: [round(r["loss"], 4) for r in v.records][:3] for name, v in variants.items()}
    exact = {name: [r["loss"] for r in v.records] for name, v in variants.items()}   # (offload changes no bits)
    same = {name: got == next(iter(exact.values())) for name, got in list(exact.items())[1:]}
    details = (f"{n_params / 1e6:.1f}M parameters ({args.layers} x {args.d_model}, vocab 50257, "
               f"untied head), {args.batch} x {args.seq} tokens, bf16, ZeRO stage 3, "
               f"1 GPU; {args.warmup} warm-up + {args.steps} timed steps in blocks of {args.block or max(1, args.steps // 2)}, "
               f"interleaved; first losses {losses}; every loss bitwise the first variant's: {same}")
    if peer.get("versions"):
        details += f"; peer {peer['versions']}"
    emit(lines, details, SCRIPT, out)
    offloaded = [n for n, v in variants.items() if v.engine.zero.cfg.offload_optimizer is not None]
    if offloaded and triad_s:
        tri = 12 * variants[offloaded[0]].engine.zero.layout.partition_numel / min(triad_s) / 1e9
        lines = [f"| variant | host AdamW s/step | GB/s | / in-place triad ({tri:.1f} GB/s) | share of the step |",
                 "|---|---|---|---|---|"]
        for name in offloaded:
            v = variants[name]
            s = float(np.median([r["adam_s"] for r in v.records]))
            gbs = adam_bytes(v.engine) / s / 1e9
            lines.append(f"| {name} | {s:.3f} | {gbs:.1f} | **{gbs / tri:.2f}** | {s / ms[name]:.2f} |")
        item = np.dtype(variants[offloaded[0]].engine.dtype).itemsize
        emit(lines, f"host AdamW: {6 * 4 + 2 * item} B moved per parameter it updates (Twin-Flow's device share "
                    f"aside); triad best of {len(triad_s)} x 3", SCRIPT, None)
    if dd and "nvme" in variants:
        rec = variants["nvme"].records
        rd, wr = np.median([r["io"][0] for r in rec]), np.median([r["io"][1] for r in rec])
        dd_w, dd_r = np.median([d[1] for d in dd]), np.median([d[2] for d in dd])   # rewrite, read GB/s
        roof = rd / dd_r / 1e9 + wr / dd_w / 1e9
        lines = ["| nvme step s | read GB/step | written GB/step | dd read / write GB/s | disk roofline s | "
                 "step / roofline |", "|---|---|---|---|---|---|",
                 f"| {ms['nvme']:.2f} | {rd / 1e9:.2f} | {wr / 1e9:.2f} | {dd_r:.2f} / {dd_w:.2f} | {roof:.2f} | "
                 f"**{ms['nvme'] / roof:.2f}** |"]
        emit(lines, "dd O_DIRECT 1 MiB blocks, 1 GiB, before and after the steps", SCRIPT, None)


def add_parser(sub):
    o = sub.add_parser("offload", help="ZeRO-3 with offload against DeepSpeed, the CPU's memory and the disk")
    o.add_argument("--variants", nargs="+", default=["none", "opt", "params+opt"],
                   help=f"of {list(VARIANTS)}, each optionally followed by /KEY=VALUE... (config overrides of its "
                        "own; refimpl only), /piece=N (the overlapped host update's piece; 0: whole sub-groups) or "
                        "/pieces=N (its most pieces; 0: no bound), /lanes=N (its lanes; 0: one worker thread), "
                        "/threads=N, /chunk=N (that worker's numba threads and parallel chunk size)")
    o.add_argument("--batch", type=int, default=8)
    o.add_argument("--seq", type=int, default=1024)
    o.add_argument("--layers", type=int, default=12)
    o.add_argument("--d-model", type=int, default=768)
    o.add_argument("--heads", type=int, default=12)
    o.add_argument("--steps", type=int, default=6)
    o.add_argument("--block", type=int, default=0, help="consecutive steps per variant (default: half of --steps)")
    o.add_argument("--warmup", type=int, default=2)
    o.add_argument("--path", default=None, help="folder for the NVMe swap files (default: the temp folder)")
    o.add_argument("--no-peer", action="store_true", help="refimpl only")
    o.add_argument("--peer-variants", nargs="+", default=None, help="DeepSpeed's variants (default: --variants)")
    o.add_argument("--peer-timeout", type=float, default=1800, help="seconds per DeepSpeed variant")
    o.add_argument("--host-profile", default=None, help="then cProfile two steps of this variant")
    o.add_argument("--backend", default="cupy", help="numpy or numba: a dry run of the same path on the CPU")
    o.add_argument("--set", action="append", default=[], help="config override for every variant")
    o.add_argument("--timeline", default=None, help="write each variant's last step's ledger events (JSON)")
    o.add_argument("--out")
    return o
