"""GPU benchmarks of the CuPy backend against PyTorch on the same GPU, same run (issue 6).

    python3 benchmarks/gpu.py attention [--seqs 1024 2048 4096 8192] [--dims 64 128] [--out FILE]
    python3 benchmarks/gpu.py step [--batch 8] [--seq 1024] [--steps 10] [--out FILE]
    python3 benchmarks/gpu.py nvme [--gib 4] [--chunk-mib 64] [--path DIR] [--out FILE]

attention: forward and forward+backward of causal attention in bf16, refimpl's FlashAttention-2 RawKernels
(`backend.attention(..., block_size=64)` and `attention_backward`) against
`torch.nn.functional.scaled_dot_product_attention` (flash / cuDNN, whatever torch picks), at FlashAttention-2's
benchmark shapes: batch = 16k tokens / seq, heads = 2048 / head_dim. TFLOP/s by FlashAttention's convention:
forward 4*B*H*T*T*D, halved for causal; backward 2.5x the forward.

step: one training step of a GPT-2-small-sized model (12 layers, d_model 768, 12 heads, vocab 50257, tied
embeddings: 124M parameters) in bf16 mixed precision: refimpl (`refimpl train`'s engine, stage 0, backend cupy,
bf16 parameters and gradients, fp32 master and AdamW) against the same architecture in PyTorch eager
(`torch.autocast` bf16, fp32 parameters, fused AdamW), tokens/s, and model FLOP utilisation: 6 N + 12 L T d FLOPs
per token (PaLM's count) against the H200's dense bf16 peak, 989 TFLOP/s.

nvme: NVMe -> GPU parameter streaming, the path stage 3 with offload_param=nvme takes (ParamSwapper: swap_in_async
reads `buffer_count` chunks ahead into aligned host buffers, to_device waits for the read, verifies its crc32 and
copies it to the GPU), over --gib of bf16 chunks of --chunk-mib each, against `dd iflag=direct bs=1M` reading a
file of the same size on the same filesystem. The page cache is dropped before each read where the machine allows.

Timing: CUDA events around each call, median of the timed repetitions after warm-up; variants interleaved.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _report import emit  # noqa: E402  (benchmarks/ is the script's folder)
from refimpl.backend import get_backend, use_backend  # noqa: E402

PEAK_BF16 = 989e12   # H100/H200 SXM dense bf16 tensor-core peak (NVIDIA's datasheet)


def cuda_time(fn, reps, warmup, sync):
    """Median milliseconds of fn() over reps, timed by wall clock around a device synchronisation."""
    import time
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(out))


def bench_attention(args):
    import ml_dtypes
    import torch
    F = torch.nn.functional
    be = get_backend("cupy")
    cp = be.xp
    lines = ["| head dim | seq | batch x heads | torch fwd TFLOP/s | refimpl fwd TFLOP/s | torch fwd+bwd TFLOP/s "
             "| refimpl fwd+bwd TFLOP/s | refimpl / torch (fwd+bwd) |", "|---|---|---|---|---|---|---|---|"]
    for D in args.dims:
        for T in args.seqs:
            B, H = max(1, 16384 // T), 2048 // D
            rng = np.random.default_rng(0)
            host = [rng.standard_normal((B, H, T, D), dtype=np.float32) for _ in range(4)]
            tq, tk, tv, tdo = (torch.from_numpy(h).to("cuda", torch.bfloat16) for h in host)
            for t in (tq, tk, tv):
                t.requires_grad_(True)
            rq, rk, rv, rdo = (be.asarray(h.astype(ml_dtypes.bfloat16)) for h in host)
            fwd_flops = 4 * B * H * T * T * D / 2
            sync_t, sync_c = torch.cuda.synchronize, cp.cuda.Device().synchronize

            def t_fwd():
                with torch.no_grad():
                    F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

            def t_fb():
                o = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
                o.backward(tdo)

            state = {}

            def r_fwd():
                state["out"], state["lse"] = be.attention(rq, rk, rv, causal=True, block_size=64)

            def r_fb():
                out, lse = be.attention(rq, rk, rv, causal=True, block_size=64)
                be.attention_backward(rdo, rq, rk, rv, out, lse, causal=True, block_size=64)

            ms = {}
            for name, fn, sync in (("t_fwd", t_fwd, sync_t), ("r_fwd", r_fwd, sync_c),
                                   ("t_fb", t_fb, sync_t), ("r_fb", r_fb, sync_c)):
                ms[name] = cuda_time(fn, args.reps, 2, sync)
            # the same numbers? (bf16 outputs of both, relative to the output's scale)
            ref = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True).detach().float().cpu().numpy()
            got = be.to_numpy(state["out"]).astype(np.float32)
            err = float(np.abs(ref - got).max() / np.abs(ref).max())
            tf = lambda flops, m: flops / (m / 1e3) / 1e12  # noqa: E731
            lines.append(f"| {D} | {T} | {B} x {H} | {tf(fwd_flops, ms['t_fwd']):.0f} | {tf(fwd_flops, ms['r_fwd']):.0f} "
                         f"| {tf(3.5 * fwd_flops, ms['t_fb']):.0f} | {tf(3.5 * fwd_flops, ms['r_fb']):.0f} "
                         f"| {ms['t_fb'] / ms['r_fb']:.2f}x (max rel. diff of out {err:.1e}) |")
            print(lines[-1], flush=True)
            torch.cuda.empty_cache()
            cp.get_default_memory_pool().free_all_blocks()
    emit(lines, f"{torch.cuda.get_device_name()}; bf16, causal; torch {torch.__version__} SDPA; "
                f"refimpl cupy FlashAttention-2 RawKernels; median of {args.reps}", __file__, args.out)


def bench_step(args):
    import torch
    from refimpl.config import load_config
    from refimpl.engine import Engine
    from refimpl.train import build
    from train_step_cpu import torch_model
    sets = ["backend=cupy", "world_size=1", "zero_optimization.stage=0", "zero_optimization.offload_param=null",
            "zero_optimization.offload_optimizer=null", "memory.device_bytes=null", "bf16.enabled=true",
            "model.vocab_size=50257", "model.n_layers=12", "model.d_model=768", "model.n_heads=12",
            f"model.max_seq_len={args.seq}", f"data.seq_len={args.seq}", "model.attention=tiled",
            "model.tie_embeddings=true", f"train_micro_batch_size_per_gpu={args.batch}", "scheduler=null",
            "gradient_clipping=1.0"]
    config = load_config(None, sets)
    be, dataset, model = build(config)
    with use_backend(be):
        engine = Engine(model, config, be)
    cfg = model.cfg
    tm = torch_model(torch, cfg).cuda()
    tm.lm_head.weight = tm.tok_emb.weight                     # tied, as refimpl's tie_embeddings
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-4, fused=True)
    batches = [dataset.get_batch("train", s, args.batch, args.seq) for s in range(args.steps + 2)]

    def refimpl_step(b):
        with use_backend(be):
            loss, _ = model.loss(b)
            engine.backward(loss)
            engine.step()
        return loss

    def torch_step(b):
        ids = torch.from_numpy(b.ids).cuda()
        tgt = torch.from_numpy(b.targets).cuda()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = tm(ids)
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
        opt.step()
        return loss

    import time
    ms = {"refimpl (cupy)": [], "torch eager": []}
    for s, b in enumerate(batches):
        for name, fn, sync in (("refimpl (cupy)", refimpl_step, be.synchronize),
                               ("torch eager", torch_step, torch.cuda.synchronize))[::1 if s % 2 else -1]:
            sync()
            t0 = time.perf_counter()
            fn(b)
            sync()
            if s >= 2:
                ms[name].append((time.perf_counter() - t0) * 1e3)
    n = model.num_parameters()
    tokens = args.batch * args.seq
    flops = tokens * (6 * n + 12 * cfg.n_layers * args.seq * cfg.d_model)
    lines = ["| implementation | ms per step (median) | tokens/s | MFU (989 TFLOP/s bf16) | vs torch eager |",
             "|---|---|---|---|---|"]
    t_ms = float(np.median(ms["torch eager"]))
    for name, v in ms.items():
        m = float(np.median(v))
        lines.append(f"| {name} | {m:.1f} | {tokens / (m / 1e3):,.0f} | {flops / (m / 1e3) / PEAK_BF16:.1%} "
                     f"| {t_ms / m:.2f}x |")
    emit(lines, f"{torch.cuda.get_device_name()}; {n / 1e6:.0f}M parameters (12 x 768, vocab 50257, tied), "
                f"{args.batch} x {args.seq} tokens, bf16 mixed precision; {args.steps} timed steps after 2, "
                f"interleaved; torch {torch.__version__}", __file__, args.out)


def bench_nvme(args):
    import shutil
    import subprocess
    import tempfile
    import time

    import ml_dtypes
    from nvme_bandwidth import drop_caches
    from refimpl.memory.ledger import Ledger
    from refimpl.memory.nvme import NVMeStore
    from refimpl.memory.param_offload import ParamSwapper
    from refimpl.zero.partition import PartitionLayout
    be = get_backend(args.backend)
    folder = tempfile.mkdtemp(prefix="nvme-gpu-", dir=args.path)
    try:
        chunk = args.chunk_mib * (1 << 20) // 2                         # bf16 elements per chunk
        n = max(1, int(args.gib * (1 << 30)) // (2 * chunk))
        layout = PartitionLayout([(f"p{i}", (chunk,)) for i in range(n)], 1)
        swapper = ParamSwapper(layout, 0, ml_dtypes.bfloat16, device="nvme", backend=be, ledger=Ledger(),
                               store=NVMeStore(os.path.join(folder, "swap")), buffer_count=args.buffer_count,
                               buffer_size=chunk)
        rng = np.random.default_rng(0)
        for s in layout.slots:
            swapper.write_chunk(s, rng.standard_normal(chunk, dtype=np.float32).astype(ml_dtypes.bfloat16))
        swapper.finish_writes()
        total = n * chunk * 2
        dd_file = os.path.join(folder, "dd.bin")
        subprocess.run(["dd", "if=/dev/urandom", f"of={dd_file}", "bs=1M", f"count={total >> 20}", "oflag=direct",
                        "status=none"], check=True)
        rows = []
        for rep in range(args.reps):
            dropped = drop_caches()
            t0 = time.perf_counter()
            subprocess.run(["dd", f"if={dd_file}", "of=/dev/null", "bs=1M", "iflag=direct", "status=none"], check=True)
            dd_s = time.perf_counter() - t0
            dropped &= drop_caches()
            t0 = time.perf_counter()
            slots = layout.slots
            for i, s in enumerate(slots):
                for ahead in slots[i:i + args.buffer_count]:              # the prefetcher's read-ahead
                    if not swapper.swap_in_async(ahead):
                        break
                dev = swapper.to_device(s)
            be.synchronize()
            gpu_s = time.perf_counter() - t0
            del dev
            rows.append((total / dd_s / 1e9, total / gpu_s / 1e9, dropped))
        dd_gbs = float(np.median([r[0] for r in rows]))
        gpu_gbs = float(np.median([r[1] for r in rows]))
        lines = ["| path | GB/s (median of %d) | / dd |" % args.reps, "|---|---|---|",
                 f"| dd iflag=direct bs=1M -> /dev/null | {dd_gbs:.2f} | 1.00 |",
                 f"| NVMeStore -> host -> device ({be.name}; ParamSwapper, {args.buffer_count} reads ahead) | {gpu_gbs:.2f} "
                 f"| {gpu_gbs / dd_gbs:.2f} |"]
        emit(lines, f"{n} chunks of {args.chunk_mib} MiB ({total / 2**30:.1f} GiB), bf16; page cache dropped: "
                    f"{all(r[2] for r in rows)}; crc32 verified on every chunk", __file__, args.out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("attention")
    a.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    a.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    a.add_argument("--reps", type=int, default=10)
    a.add_argument("--out")
    s = sub.add_parser("step")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--seq", type=int, default=1024)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--out")
    v = sub.add_parser("nvme")
    v.add_argument("--gib", type=float, default=4.0)
    v.add_argument("--chunk-mib", type=int, default=64)
    v.add_argument("--buffer-count", type=int, default=5)
    v.add_argument("--reps", type=int, default=3)
    v.add_argument("--path", default=None, help="folder on the disk to measure (default: the temp folder)")
    v.add_argument("--backend", default="cupy", help="numpy: the same path ending in host memory (a dry run)")
    v.add_argument("--out")
    args = ap.parse_args()
    {"attention": bench_attention, "step": bench_step, "nvme": bench_nvme}[args.what](args)


if __name__ == "__main__":
    main()
