"""Per-rank model-state memory and traffic of ZeRO stages 0-3, measured (ZeRO paper §5, Figure 1; §7).

Trains the default model for a few steps at each stage on N simulated ranks and prints, per rank: bytes of
parameters, gradients and optimizer states actually allocated, their total next to the paper's formula
(Ψ = parameters, K = 12 for mixed-precision Adam: stage 0 (2+2+K)Ψ, stage 1 2Ψ+2Ψ+KΨ/N, stage 2
2Ψ+(2+K)Ψ/N, stage 3 (2+2+K)Ψ/N), and the bytes each rank sent per step (ring-algorithm volumes).

    python examples/zero_memory_table.py [--world-size 4] [--steps 2] [--precision fp16|bf16|fp32]
"""
from __future__ import annotations

import argparse
import tempfile

from refimpl.config import load_config
from refimpl.train import train


def paper_formula(stage: int, psi: int, n: int, item: int, k: int) -> float:
    p, g = item * psi, item * psi
    return {0: p + g + k * psi, 1: p + g + k * psi / n, 2: p + (g + k * psi) / n, 3: (p + g + k * psi) / n}[stage]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    args = ap.parse_args(argv)
    item, k = (4, 8) if args.precision == "fp32" else (2, 12)
    rows = []
    for stage in range(4):
        overrides = [f"world_size={args.world_size}", f"zero_optimization.stage={stage}", f"run.steps={args.steps}",
                     "zero_optimization.stage3_param_persistence_threshold=0", "run.eval_batches=1"]
        if args.precision != "fp32":
            overrides.append(f"{args.precision}.enabled=true")
        with tempfile.TemporaryDirectory() as d:
            s = train(load_config(None, overrides), f"{d}/run", progress=False)
        psi = s["parameters"]
        sent = sum(v for key, v in s.items() if key.endswith("_bytes_sent_per_rank"))
        rows.append((stage, s["bytes_params_per_rank"], s["bytes_grads_per_rank"], s["bytes_optimizer_per_rank"],
                     s["model_state_bytes_per_rank"], paper_formula(stage, psi, args.world_size, item, k),
                     sent / args.steps))
    print(f"Ψ = {psi:,} parameters, N = {args.world_size} ranks, {args.precision}, bytes per rank")
    head = ("stage", "params", "grads", "optimizer", "total", "paper formula", "sent per step (incl. eval, checkpoint)")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print(f"| {r[0]} | " + " | ".join(f"{int(v):,}" for v in r[1:]) + " |")


if __name__ == "__main__":
    main()
