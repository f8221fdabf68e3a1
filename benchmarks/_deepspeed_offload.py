"""DeepSpeed's ZeRO-3 training step, with and without CPU / NVMe offload: the speed peer of refimpl's GPU offload.

    from _deepspeed_offload import run_deepspeed_offload       # benchmarks/ on sys.path
    res = run_deepspeed_offload(config, weights, ["none", "opt", "params+opt"], steps=10, warmup=2, workdir=d)
    python3 benchmarks/_deepspeed_offload.py [--set K=V ...] [--variants none opt] [--steps 3] [--warmup 1]

Each variant is one fresh process (`--worker`, rank 0 of a world of 1: NCCL on a GPU, gloo on a CPU) that builds
refimpl's torch twin (refimpl/interop/torch.py) from refimpl's step-0 ``weights``, hands it to
``deepspeed.initialize`` with ZeRO stage 3 and the config's optimizer, scheduler, precision, clipping and
zero_optimization knobs (refimpl.crosscheck.deepspeed_side.deepspeed_config), plus the variant's offload:

    none        nothing offloaded (FusedAdam on the GPU; torch's AdamW where it cannot be JIT-built)
    opt         offload_optimizer cpu, pinned (DeepSpeedCPUAdam, JIT-built on first use)
    params+opt  offload_param cpu + offload_optimizer cpu, pinned
    twin        params+opt with offload_optimizer.ratio 0.5, sub_group_size 2e7 (Twin-Flow)
    nvme        both on NVMe under nvme_path (DeepSpeed's async_io op; needs libaio)

and trains warmup + steps steps on refimpl's batches (refimpl.data, as crosscheck's deepspeed_worker does).
Per timed step: step_s (forward + backward + optimizer step), fb_s (forward + backward of every micro-batch),
opt_s (``engine.step()`` at the boundary: reduce, CPU Adam, copy back), each with the device synchronised
around it; the loss. Batches are drawn before the clock starts. A variant that fails reports its error and the
others still run; its log is <workdir>/deepspeed_<variant>.log. On a machine without DeepSpeed, first run
``eval "$(bash benchmarks/install_deepspeed_peer.sh)"`` from the repository root (it installs from .peer/).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("none", "opt", "params+opt", "twin", "nvme")
INSTALL_HINT = 'eval "$(bash benchmarks/install_deepspeed_peer.sh)" (from the repository root)'


def run_deepspeed_offload(config: dict, weights: dict, variants: list[str], steps: int, warmup: int,
                          workdir: str, nvme_path: str | None = None, timeout: float = 1800,
                          raw: dict | None = None) -> dict:
    """{variant: {step_s, fb_s, opt_s, losses, n_params, optimizer, error}, "versions": {...}} over the timed
    steps (losses[i] is the loss of step warmup + i + 1). ``raw``: refimpl.config.merge_layers' output, so that
    DeepSpeed-only keys the user set (overlap_comm, ...) reach DeepSpeed too."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ImportError(f"deepspeed is not importable by {sys.executable}; install it with {INSTALL_HINT}")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variants {bad}; choose from {VARIANTS}")
    if config["world_size"] != 1:
        raise ValueError(f"world_size={config['world_size']}: the DeepSpeed peer runs one rank")
    from refimpl.crosscheck.deepspeed_side import deepspeed_config
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / "weights0.npz", **{n: np.ascontiguousarray(a, np.float32) for n, a in weights.items()})
    biggest = max(int(np.prod(a.shape)) for a in weights.values())
    results, versions = {}, None
    for variant in variants:
        name = variant.replace("+", "_")
        log, out = work / f"deepspeed_{name}.log", work / f"deepspeed_{name}.json"
        out.unlink(missing_ok=True)
        swap = Path(nvme_path).resolve() / f"deepspeed_swap_{os.getpid()}" if nvme_path else None
        if variant == "nvme" and swap is None:
            results[variant] = _failed("the nvme variant needs nvme_path")
            continue
        ds = deepspeed_config(config, raw or {}, work / "swap")
        zero = ds["zero_optimization"]
        for kind in ("offload_param", "offload_optimizer"):   # the variant decides, not the config
            zero.pop(kind, None)
        zero.update(_offload(variant, config["zero_optimization"], swap, biggest))
        spec = {"config": config, "ds_config": ds, "weights": str(work / "weights0.npz"), "steps": steps,
                "warmup": warmup, "out": str(out), "repo": str(REPO)}
        (work / f"deepspeed_{name}.spec.json").write_text(json.dumps(spec, indent=1))
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(_free_port())}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(work / f"deepspeed_{name}.spec.json")]
        with open(log, "w") as f:   # own session: a timeout kills the compiler children too
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
        if swap is not None:
            shutil.rmtree(swap, ignore_errors=True)
        if code == 0 and out.exists():
            res = json.loads(out.read_text())
            versions = versions or res.pop("versions")
            res.pop("versions", None)
            results[variant] = {**res, "error": None}
        else:
            why = f"timed out after {timeout:.0f} s" if code is None else _last_error(log)
            results[variant] = _failed(f"{why} (log: {log})")
    results["versions"] = versions or {"deepspeed": importlib.metadata.version("deepspeed"),
                                       "torch": importlib.metadata.version("torch"), "cuda": None,
                                       "accelerator": None}
    return results


def _offload(variant: str, zero: dict, swap: Path | None, biggest: int) -> dict:
    """The variant's offload_param / offload_optimizer sections (refimpl's buffer counts and sizes for NVMe)."""
    if variant == "none":
        return {}
    if variant == "twin":     # ZeRO-Offload++ Twin-Flow: half the sub-groups updated on the GPU
        cpu = {"device": "cpu", "pin_memory": True}
        return {"offload_optimizer": {**cpu, "ratio": 0.5}, "offload_param": dict(cpu), "sub_group_size": 20_000_000}
    if variant != "nvme":
        cpu = {"device": "cpu", "pin_memory": True}
        return {"offload_optimizer": cpu, **({"offload_param": dict(cpu)} if variant == "params+opt" else {})}
    out = {}
    for kind, count in (("offload_param", 5), ("offload_optimizer", 4)):
        base = zero.get(kind) or {}
        out[kind] = {"device": "nvme", "nvme_path": str(swap), "pin_memory": True,
                     "buffer_count": base.get("buffer_count") or count}
    # one swap buffer holds a whole parameter (with world_size 1 its partition), aligned to the aio block
    size = int((zero.get("offload_param") or {}).get("buffer_size") or 1e8)
    out["offload_param"]["buffer_size"] = max(size, -(-biggest // 2**20) * 2**20)
    return out


def _failed(error: str) -> dict:
    return {"step_s": [], "fb_s": [], "opt_s": [], "losses": [], "n_params": 0, "optimizer": None,
            "error": error}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_error(log: Path) -> str:
    """The worker's last exception line and the line under it; else the log's last lines."""
    raw = log.read_text(errors="replace").splitlines()
    lines = [t for t in (re.sub(r"^\[rank\d+\]:", "", ln).strip() for ln in raw) if t]   # torch's rank prefix
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"^[\w.]*(Error|Exception|Exit)\b", lines[i]):
            return " ".join(lines[i:i + 2])[:500]
    return " | ".join(lines[-3:])[:500] if lines else "(no output)"


def _worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, spec["repo"])
    import deepspeed
    import torch
    import torch.distributed as dist

    from refimpl.crosscheck.torch_side import model_config
    from refimpl.data import make_dataset
    from refimpl.interop.torch import TorchTransformer, load_weights, torch_loss

    config, ds = spec["config"], spec["ds_config"]
    cuda = torch.cuda.is_available()
    zero = ds["zero_optimization"]
    if cuda and not zero.get("offload_optimizer") and not _fused_adam_builds():
        ds["optimizer"]["params"]["torch_adam"] = True
        ds["optimizer"]["params"].pop("bias_correction", None)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    dataset = make_dataset({k: v for k, v in config["data"].items() if k != "seq_len"})
    with np.load(spec["weights"]) as npz:
        twin = load_weights(TorchTransformer(model_config(config, dataset)), dict(npz))
    n_params = sum(p.numel() for p in twin.parameters())
    engine, _, _, _ = deepspeed.initialize(model=twin, model_parameters=twin.parameters(), config=ds)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    micro, gas, T = (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
                     config["data"]["seq_len"])
    rec = {"step_s": [], "fb_s": [], "opt_s": [], "losses": []}
    for step in range(spec["warmup"] + spec["steps"]):
        batches = [dataset.get_batch("train", step * gas + m, micro, T) for m in range(gas)]
        losses = []
        sync()
        t0 = time.perf_counter()
        for m, batch in enumerate(batches):
            loss = torch_loss(twin, batch, device=engine.device, forward=engine)
            engine.backward(loss)
            losses.append(loss.detach())
            if m < gas - 1:
                engine.step()   # not a boundary: DeepSpeed only counts the micro-step
        sync()
        t1 = time.perf_counter()
        engine.step()
        sync()
        t2 = time.perf_counter()
        loss = float(torch.stack(losses).float().mean())
        if step >= spec["warmup"]:
            for key, value in zip(rec, (t2 - t0, t1 - t0, t2 - t1, loss)):
                rec[key].append(value)
        print(f"step {step + 1}: loss {loss:.5f} fb {t1 - t0:.4f} s opt {t2 - t1:.4f} s", flush=True)
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    rec.update(n_params=n_params, optimizer=type(opt).__name__, versions={
        "deepspeed": deepspeed.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
        "accelerator": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)"})
    Path(spec["out"]).write_text(json.dumps(rec, indent=1))
    dist.destroy_process_group()
    return 0


def _fused_adam_builds() -> bool:
    """Whether DeepSpeed's FusedAdam loads (it is JIT-built with nvcc, so it needs a CUDA toolkit)."""
    from deepspeed.accelerator import get_accelerator
    try:
        get_accelerator().create_op_builder("FusedAdamBuilder").load()
        return True
    except Exception as exc:
        print(f"FusedAdam unavailable, using torch.optim.AdamW: {type(exc).__name__}: {exc}", flush=True)
        return False


def _main(argv) -> int:
    import argparse
    import tempfile
    p = argparse.ArgumentParser(description="Time DeepSpeed ZeRO-3 offload variants on refimpl's model.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    p.add_argument("--variants", nargs="+", default=["none", "opt", "params+opt"], choices=VARIANTS)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--nvme-path")
    p.add_argument("--workdir")
    a = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from refimpl.config import load_config, merge_layers
    from refimpl.crosscheck.refimpl_side import initial_weights
    overrides = ["zero_optimization.stage=3", "world_size=1", *a.overrides]
    config = load_config(None, overrides)
    res = run_deepspeed_offload(config, initial_weights(config), a.variants, a.steps, a.warmup,
                                a.workdir or tempfile.mkdtemp(prefix="ds_offload_"), a.nvme_path,
                                raw=merge_layers(None, overrides))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2]))
    sys.exit(_main(sys.argv[1:]))
