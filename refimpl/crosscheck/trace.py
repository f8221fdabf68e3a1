"""What one side of a cross-check recorded: per-step scalars and per-parameter snapshots.

Every side (refimpl, its fp64 reference run, PyTorch, DeepSpeed in its own processes) writes the same files:

    <dir>/steps.jsonl                    one line per optimizer step: step (1-based), loss, grad_norm, lr,
                                         loss_scale, skipped
    <dir>/snapshot_step<K>.safetensors   after step K: "weight/<name>" (fp32 master), "exp_avg/<name>",
                                         "exp_avg_sq/<name>", and "grad/<name>" (step K's gradient: averaged over
                                         ranks and micro-batches, divided by the loss scale, before clipping)

Quantities keep the dtype the side holds them in (float32, float64 for the fp64 run); comparisons read them as
float64. Nothing is loaded with pickle.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

QUANTITIES = ("weight", "grad", "exp_avg", "exp_avg_sq")
SCALARS = ("loss", "grad_norm", "lr", "loss_scale")


class TraceError(ValueError):
    """A side's trace is missing or unreadable."""


@dataclass
class Trace:
    name: str
    steps: list = field(default_factory=list)          # dicts: step, loss, grad_norm, lr, loss_scale, skipped
    snapshots: dict = field(default_factory=dict)      # step -> quantity -> name -> array

    def record(self, step: int, *, loss, grad_norm, lr, loss_scale, skipped) -> None:
        self.steps.append({"step": int(step), "loss": float(loss), "grad_norm": float(grad_norm), "lr": float(lr),
                           "loss_scale": float(loss_scale), "skipped": bool(skipped)})

    def snapshot(self, step: int, quantity: str, arrays: dict) -> None:
        if quantity not in QUANTITIES:
            raise ValueError(f"unknown quantity {quantity!r}; allowed: {QUANTITIES}")
        self.snapshots.setdefault(int(step), {})[quantity] = {n: np.ascontiguousarray(a) for n, a in arrays.items()}

    def skipped_steps(self) -> list[int]:
        return [r["step"] for r in self.steps if r["skipped"]]

    # ------------------------------------------------------------------------------------------- files
    def write(self, directory) -> Path:
        from safetensors.numpy import save_file
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _write_text(d / "steps.jsonl", "".join(json.dumps(_json_safe(r)) + "\n" for r in self.steps))
        for step, quantities in self.snapshots.items():
            flat = {f"{q}/{n}": a for q, arrays in quantities.items() for n, a in arrays.items()}
            tmp = d / f".snapshot_step{step}.safetensors.tmp"
            save_file(flat, str(tmp))
            os.replace(tmp, d / f"snapshot_step{step}.safetensors")
        return d

    @classmethod
    def read(cls, directory, name: str | None = None) -> "Trace":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        d = Path(directory)
        if not (d / "steps.jsonl").is_file():
            raise TraceError(f"{d}: no steps.jsonl (the side did not finish)")
        trace = cls(name or d.name)
        for i, line in enumerate((d / "steps.jsonl").read_text().splitlines()):
            try:
                rec = json.loads(line)
                trace.record(rec["step"], **{k: _from_json(rec[k]) for k in SCALARS}, skipped=rec["skipped"])
            except (ValueError, KeyError, TypeError) as exc:
                raise TraceError(f"{d / 'steps.jsonl'} line {i + 1}: {exc}") from None
        for path in sorted(d.glob("snapshot_step*.safetensors")):
            step = int(path.name[len("snapshot_step"):-len(".safetensors")])
            try:
                flat = load_file(str(path))
            except (SafetensorError, OSError) as exc:
                raise TraceError(f"{path}: {exc}") from None
            for key, arr in flat.items():
                quantity, _, pname = key.partition("/")
                trace.snapshots.setdefault(step, {}).setdefault(quantity, {})[pname] = arr
        return trace


def _json_safe(rec: dict) -> dict:
    """inf/nan as strings (JSON has neither): a skipped fp16 step has an infinite gradient norm."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}


def _from_json(v):
    return float(v) if isinstance(v, str) else v


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
