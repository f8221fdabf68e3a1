"""The DeepSpeed peer of a cross-check: real DeepSpeed, in its own processes, under torchrun.

refimpl's config *is* a DeepSpeed config plus refimpl's own sections (model, data, run, ...). DeepSpeed gets
``deepspeed_config``: every DeepSpeed section at the value refimpl resolved (DeepSpeed's names and defaults, so
spelling them out changes nothing for DeepSpeed), plus the DeepSpeed keys refimpl accepts without acting on them
(refimpl/deepspeed_keys.py) exactly as the user wrote them, so that their effect on DeepSpeed shows up in the
comparison. Processes: ``torchrun --standalone --nproc_per_node world_size``, the gloo backend on CPU (NCCL when
refimpl runs on a GPU backend); deepspeed_worker.py is one rank.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..deepspeed_keys import deepspeed_only
from .torch_side import PeerError
from .trace import Trace, TraceError

DEEPSPEED_SECTIONS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                      "gradient_clipping", "optimizer", "scheduler", "fp16", "bf16", "zero_optimization",
                      "activation_checkpointing", "aio")


def deepspeed_config(config: dict, raw: dict, swap_dir) -> dict:
    """The DeepSpeed config of a resolved refimpl ``config`` (``raw``: the merged config before validation)."""
    ds = {k: copy.deepcopy(config[k]) for k in DEEPSPEED_SECTIONS if config[k] is not None}
    del ds["aio"]["engine"]                             # refimpl's own key: which NVMe store refimpl uses
    zero = ds["zero_optimization"]
    for name in ("offload_param", "offload_optimizer"):
        if zero[name] is None:
            del zero[name]
        elif zero[name]["nvme_path"] is not None:       # the peer swaps into a folder of its own
            zero[name]["nvme_path"] = str(Path(swap_dir).resolve())
    if ds["optimizer"]["params"]["torch_adam"]:
        del ds["optimizer"]["params"]["bias_correction"]   # torch.optim.Adam(W) takes no such argument
    for path, value in deepspeed_only(raw).items():
        *parents, last = path.split(".")
        node = ds
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = copy.deepcopy(value)
    ds.setdefault("steps_per_print", 10**9)            # DeepSpeed's step logs would drown the worker's output
    return ds


def run_deepspeed(config: dict, raw: dict, steps: int, snapshot_steps, weights: dict, out_dir,
                  progress=None, timeout=None) -> Trace:
    """Run DeepSpeed on config["world_size"] processes; return rank 0's Trace (out_dir/deepspeed/)."""
    if importlib.util.find_spec("deepspeed") is None or importlib.util.find_spec("torch") is None:
        raise PeerError("deepspeed is not installed; install it with pip install -e \".[crosscheck]\"")
    from safetensors.numpy import save_file
    d = Path(out_dir) / "deepspeed"
    d.mkdir(parents=True, exist_ok=True)
    save_file({n: np.ascontiguousarray(a, np.float32) for n, a in weights.items()}, str(d / "weights0.safetensors"))
    gpu = config["backend"] == "cupy"
    ds_config = deepspeed_config(config, raw, d / "swap")
    (d / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    spec = {"config": config, "ds_config": ds_config, "weights": str(d / "weights0.safetensors"), "steps": steps,
            "snapshot_steps": sorted(snapshot_steps), "out": str(d), "dist_backend": "nccl" if gpu else "gloo"}
    (d / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", str(config["world_size"]), "-m", "refimpl.crosscheck.deepspeed_worker",
           str(d / "spec.json")]
    env = dict(os.environ)
    if not gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    log = d / "worker.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.PIPE, text=True, env=env)
        for line in proc.stderr:               # the worker's progress lines, and everything else to the log
            f.write(line)
            if line.startswith("deepspeed step ") and progress is not None:
                progress("deepspeed")
        code = proc.wait(timeout=timeout)
    if code != 0:
        raise PeerError(f"DeepSpeed failed (exit {code}): {_last_error(log)} (full log: {log})")
    try:
        return Trace.read(d, "deepspeed")
    except TraceError as exc:
        raise PeerError(f"DeepSpeed finished but left no trace: {exc} (log: {log})") from None


def _last_error(log: Path) -> str:
    """The peer's own last exception ("KeyError: 'exp_avg'", with the detail lines a pydantic ValidationError
    puts under it), not torchrun's report about it; else the last line of the log."""
    raw = [ln.rstrip() for ln in log.read_text(errors="replace").splitlines()]
    lines = [(re.sub(r"^\[rank\d+\]:", "", ln).strip(), ln.startswith("[rank")) for ln in raw if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        text = lines[i][0]
        if re.match(r"^[\w.]*(Error|Exception|Exit)\b", text) and "ChildFailedError" not in text:
            detail = [t for t, ranked in lines[i + 1:i + 3]
                      if ranked and not t.startswith(("For further", "[")) and "Warning" not in t]
            return " ".join([text.split(".")[-1] if text.startswith("pydantic") else text] + detail)[:400]
    return lines[-1][0][:400] if lines else "(no output)"
