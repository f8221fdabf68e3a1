"""`refimpl estimate`: the memory and bandwidth arithmetic of ZeRO, ZeRO-Infinity and DeepSpeed's estimators.

Nothing here trains or allocates; it is the arithmetic a person does before choosing a ZeRO stage and offload.
Ψ is the parameter count, N = gpus_per_node × nodes the data-parallel ranks, K = 12 the bytes per parameter of
fp32 optimizer state under mixed-precision Adam (master weights, momentum, variance).

1. Model states, partitioned (ZeRO, arXiv 1910.02054, §5 and Figure 1): fp16 parameters 2Ψ, fp16 gradients
   2Ψ, fp32 optimizer states KΨ. Stage 1 divides KΨ by N, stage 2 also the gradients, stage 3 also the
   parameters. Offload moves a partition to another tier and keeps its size: `offload_optimizer` takes the
   optimizer states and (stages 2-3) the gradient partition, as ZeRO-Offload moves reduced gradient
   partitions to the host; `offload_param` (stage 3 only, as in DeepSpeed) takes the parameter partition.
2. DeepSpeed's own estimators, transcribed exactly (DeepSpeed, deepspeed/runtime/zero/stage_1_and_2.py
   `estimate_zero2_model_states_mem_needs`, and deepspeed/runtime/zero/stage3.py
   `estimate_zero3_model_states_mem_needs`): they count 18 bytes per parameter on the GPU (2 fp16 params +
   2 fp16 grads + 4 fp32 grads + 4 fp32 params + 8 Adam moments), add `4 × largest_layer_params` (the fp16
   parameters and gradients of the largest layer, gathered whole) under stage 3, and size CPU memory per node
   with `additional_buffer_factor` = 1.5, including the fp32 copy of the model PyTorch creates before
   `zero.Init` partitions it. The stage-2 no-offload GPU figure is `2Ψ + 18Ψ/N` since DeepSpeed PR #5099
   (2024); the printed example in DeepSpeed's docs/code-docs/source/memory.rst predates it (`4Ψ + 16Ψ/N`).
3. The paper's §3 (ZeRO-Infinity, arXiv 2104.07857, "Memory requirements"), for a transformer of nl layers
   of hidden size hd: parameters ≈ 12 × nl × hd² (four linears: hd×3hd, hd×hd, hd×4hd, 4hd×hd); model
   states 240 × nl × hd² bytes (20 bytes per parameter, Figure 2a); activation checkpoints
   2 × bsz × seq × hd × nl / ci bytes (one fp16 input of size bsz × seq × hd kept every ci blocks);
   activation working memory (AWM), the activations between two checkpoints recomputed in backward,
   bsz × seq × ci × (16 × hd + 2 × attn_heads × seq) bytes; model-state working memory (MSWM), the
   parameters and gradients of the largest single operator (the hd → 4hd linear), 4 × hd × 4hd bytes.
4. The paper's §4 ("Bandwidth requirements"): efficiency = ait × bw / (ait × bw + peak_tp), where the
   arithmetic intensity ait = total computation / bytes moved is seq × bsz for parameters and gradients,
   seq × bsz / 4 for optimizer states and 24 × hd × ci for activation checkpoints (computation per step
   2 × 4 × 12 × bsz × seq × nl × hd², with the recomputation forward). Solving for bw gives the bandwidth a
   target efficiency needs: bw = e / (1 − e) × peak_tp / ait. Bandwidth-centric partitioning (§6.1) has
   every rank read its own 1/N shard over its own link, so the bandwidths here are per GPU.

Where refimpl's own numbers differ (its run summary reports `model_state_bytes_per_rank` from what it
actually allocates): every parameter is padded to a multiple of N before it is cut, so a partition is
Σ ceil(numel / N) elements, a little over Ψ/N; at stage 3 parameters under
`stage3_param_persistence_threshold` stay whole on every rank; an fp32 run keeps no separate master copy
(K = 8); and no gradient buckets, gathered layers, 1.5 buffer factor or CPU figures are counted.

Bytes print as GB = 2^30 and TB = 2^40 bytes, as DeepSpeed and the paper print them; bandwidths are decimal
(GB/s = 1e9 bytes/s), as the paper's are.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

K_ADAM = 12                      # fp32 master + momentum + variance, bytes per parameter (ZeRO §3.1)
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
TIERS = ("gpu", "cpu", "nvme")
DEFAULT_PEAK_TFLOPS = 70.0       # per V100, the paper's Figure 3
# Per-GPU bandwidths, GB/s. Assumptions to override, not measurements: 70 is the §4 figure at which parameters
# and gradients pass 50% efficiency at bsz·seq = 1024; 12 is one PCIe 3.0 x16 link; 3 is the per-GPU rate the
# paper quotes for all 16 GPUs of a DGX-2 reading host memory at once, used here for NVMe.
DEFAULT_BW = {"gpu_gpu": 70.0, "cpu_gpu": 12.0, "nvme": 3.0}
BW_LABELS = {"gpu_gpu": "GPU-GPU", "cpu_gpu": "CPU-GPU", "nvme": "NVMe"}
CONSISTENCY = 0.05               # --params and --layers/--hidden must agree this closely
_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


DESCRIPTION = ("Model-state, activation and bandwidth arithmetic of ZeRO / ZeRO-Infinity (arXiv 2104.07857 "
               "§3-4) and DeepSpeed's estimate_zero2/zero3_model_states_mem_needs.")


class EstimateError(ValueError):
    """Bad input to the estimator; the message names the flag and what is allowed."""


# ---------------------------------------------------------------------------------------------- input
def parse_count(text: str, flag: str = "--params") -> int:
    """'3e9', '3B', '175B', '1.5T', '350M', '7K' -> a positive whole count."""
    s = str(text).strip()
    scale = _SUFFIX.get(s[-1:].upper(), 1.0)
    try:
        value = float(s[:-1] if scale != 1.0 else s) * scale
    except ValueError:
        raise EstimateError(f"{flag}: {text!r} is not a count; use a number such as 3e9 or 3B "
                            "(suffixes K, M, B, T)") from None
    if not math.isfinite(value) or value < 1:
        raise EstimateError(f"{flag}: {text!r} must be a finite count of at least 1")
    return int(round(value))


def transformer_params(layers: int, hidden: int, vocab: int = 0) -> int:
    """Ψ ≈ 12 × nl × hd² (ZeRO-Infinity §3), plus one (tied) vocab × hd embedding."""
    return 12 * layers * hidden * hidden + vocab * hidden


# ---------------------------------------------------------------------------------------------- 1. ZeRO
def zero_configurations() -> list[tuple[int, str, str]]:
    """(stage, offload_optimizer, offload_param) that DeepSpeed accepts: offload from stage 1, NVMe and
    parameter offload only at stage 3, parameters offloaded only when the optimizer is too."""
    rows = [(0, "none", "none"), (1, "none", "none"), (1, "cpu", "none"), (2, "none", "none"), (2, "cpu", "none")]
    rows.append((3, "none", "none"))
    rows += [(3, opt, par) for opt in ("cpu", "nvme") for par in OFFLOAD_DEVICES]
    return rows


def zero_model_state_bytes(params: int, stage: int, world_size: int, offload_optimizer: str = "none",
                           offload_param: str = "none", k: int = K_ADAM) -> dict[str, float]:
    """Bytes of model states one rank holds in each tier (gpu, cpu, nvme): ZeRO Figure 1's
    (2 + 2 + K)Ψ split by stage, each partition placed where the offload settings put it."""
    if (stage, offload_optimizer, offload_param) not in zero_configurations():
        raise EstimateError(f"stage {stage} with offload_optimizer={offload_optimizer}, offload_param="
                            f"{offload_param} is not a configuration DeepSpeed accepts")
    if not (isinstance(world_size, int) and world_size >= 1):
        raise EstimateError(f"world_size {world_size!r} must be a whole number of at least 1")
    n = world_size
    params16 = 2 * params / (n if stage >= 3 else 1)
    grads16 = 2 * params / (n if stage >= 2 else 1)
    optim32 = k * params / (n if stage >= 1 else 1)
    tier = {"none": "gpu", "cpu": "cpu", "nvme": "nvme"}
    out = dict.fromkeys(TIERS, 0.0)
    out[tier[offload_param]] += params16
    # A reduced gradient partition goes where the optimizer that consumes it lives (ZeRO-Offload);
    # stage 1 still accumulates whole gradients on the GPU.
    out[tier[offload_optimizer] if stage >= 2 else "gpu"] += grads16
    out[tier[offload_optimizer]] += optim32
    return out


# ---------------------------------------------------------------------------------------------- 2. DeepSpeed
def deepspeed_zero2_mem_needs(total_params, num_gpus_per_node=1, num_nodes=1, cpu_offload=True,
                              additional_buffer_factor=1.5) -> tuple[int, int]:
    """(cpu bytes per node, gpu bytes per GPU): DeepSpeed stage_1_and_2.py
    `estimate_zero2_model_states_mem_needs`, expression for expression."""
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        gpu_mem = 2 * total_params
        cpu_mem = total_params * max(4 * total_gpus, 16) * additional_buffer_factor
    else:
        # 2 = fp16 params; 18 = fp16 grads 2 + fp32 grads 4 + fp32 params 4 + Adam moments 8
        gpu_mem = 2 * total_params + int(18 * total_params / total_gpus)
        cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem)


def deepspeed_zero3_mem_needs(total_params, largest_layer_params, num_gpus_per_node=1, num_nodes=1,
                              cpu_offload=True, cpu_offload_params=True, zero_init=True,
                              additional_buffer_factor=1.5) -> tuple[int, int, int]:
    """(cpu bytes per node, gpu bytes per GPU, largest layer bytes): DeepSpeed stage3.py
    `estimate_zero3_model_states_mem_needs`, expression for expression."""
    total_gpus = num_nodes * num_gpus_per_node
    gpus_factor = 1 / num_nodes
    largest_layer_memory = 4 * largest_layer_params      # its fp16 params + fp16 grads, gathered whole
    if cpu_offload:
        if cpu_offload_params:
            gpu_mem = largest_layer_memory
            if zero_init:
                cpu_mem = total_params * 18 * gpus_factor * additional_buffer_factor
            else:
                cpu_mem = total_params * max(4 * num_gpus_per_node, 18 * gpus_factor) * additional_buffer_factor
        else:
            gpu_mem = largest_layer_memory + int(2 * total_params / total_gpus)
            if zero_init:
                cpu_mem = total_params * 16 * gpus_factor * additional_buffer_factor
            else:
                cpu_mem = total_params * max(4 * num_gpus_per_node, 16 * gpus_factor) * additional_buffer_factor
    else:
        gpu_mem = largest_layer_memory + int(18 * total_params / total_gpus)
        if zero_init:   # zero.Init: only one layer at a time exists unpartitioned, in fp32, per GPU process
            cpu_mem = largest_layer_params * 4 * num_gpus_per_node * additional_buffer_factor
        else:
            cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem), largest_layer_memory


# ---------------------------------------------------------------------------------------------- 3. paper §3
def paper_model_state_bytes(params: int) -> int:
    """240 × nl × hd² bytes = 20 bytes per parameter (ZeRO-Infinity §3, Figure 2a)."""
    return 20 * params


def activation_checkpoint_bytes(bsz: int, seq: int, hidden: int, layers: int, ci: int = 1) -> float:
    """2 × bsz × seq × hd × nl / ci: one fp16 block input every ci blocks (ZeRO-Infinity §3)."""
    return 2 * bsz * seq * hidden * layers / ci


def activation_working_memory_bytes(bsz: int, seq: int, hidden: int, heads: int, ci: int = 1) -> int:
    """AWM = bsz × seq × ci × (16 × hd + 2 × attn_heads × seq) (ZeRO-Infinity §3)."""
    return bsz * seq * ci * (16 * hidden + 2 * heads * seq)


def model_state_working_memory_bytes(hidden: int) -> int:
    """MSWM = 4 × hd × 4hd: fp16 parameters + gradients of the hd -> 4hd linear (ZeRO-Infinity §3)."""
    return 4 * hidden * 4 * hidden


# ---------------------------------------------------------------------------------------------- 4. paper §4
def arithmetic_intensity(bsz: int, seq: int, hidden: int | None = None, ci: int = 1) -> dict[str, float]:
    """Flops per byte moved (ZeRO-Infinity §4.1): 2·4·Ψ bytes of params+grads, 2·16·Ψ bytes of optimizer
    state and 4·nl/ci·hd·seq·bsz bytes of checkpoints, against 2·4·bsz·seq·Ψ flops."""
    out = {"params_grads": seq * bsz, "optimizer_states": seq * bsz / 4}
    if hidden is not None:
        out["activation_checkpoints"] = 24 * hidden * ci
    return out


def efficiency(ait: float, bw: float, peak_tp: float) -> float:
    """ait × bw / (ait × bw + peak_tp): compute time over compute plus (unoverlapped) transfer time."""
    return ait * bw / (ait * bw + peak_tp)


def bandwidth_for_efficiency(ait: float, target: float, peak_tp: float) -> float:
    """The bw (bytes/s) at which efficiency(ait, bw, peak_tp) == target, 0 < target < 1."""
    if not 0 < target < 1:
        raise EstimateError(f"target efficiency {target!r} must lie strictly between 0 and 1")
    return target / (1 - target) * peak_tp / ait


# ---------------------------------------------------------------------------------------------- everything
def estimate(params=None, layers=None, hidden=None, heads=None, vocab=0, largest_layer=None, gpus=1, nodes=1,
             bsz=1, seq=1024, ci=1, peak_tflops=DEFAULT_PEAK_TFLOPS, bw_gpu_gpu=DEFAULT_BW["gpu_gpu"],
             bw_cpu_gpu=DEFAULT_BW["cpu_gpu"], bw_nvme=DEFAULT_BW["nvme"]) -> dict:
    """All of the above for one model and machine, as a JSON-ready dict of plain numbers (bytes, bytes/s)."""
    counts = {"--params": params, "--layers": layers, "--hidden": hidden, "--heads": heads,
              "--largest-layer": largest_layer, "--gpus": gpus, "--nodes": nodes, "--bsz": bsz, "--seq": seq,
              "--ci": ci, "--vocab": vocab or None}
    rates = {"--peak-tflops": peak_tflops, "--bw-gpu-gpu": bw_gpu_gpu, "--bw-cpu-gpu": bw_cpu_gpu,
             "--bw-nvme": bw_nvme}
    for flag, v in counts.items():
        if v is not None and not (isinstance(v, int) and v >= 1):
            raise EstimateError(f"{flag}: {v!r} must be a whole number of at least 1")
    for flag, v in rates.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise EstimateError(f"{flag}: {v!r} must be a positive, finite number")
    if (layers is None) != (hidden is None):
        raise EstimateError("--layers and --hidden describe the model together; give both (or only --params)")
    if params is None and layers is None:
        raise EstimateError("give --params P, or --layers NL --hidden HD")
    if layers is not None:
        described = transformer_params(layers, hidden, vocab or 0)
        if params is None:
            params = described
        elif abs(params - described) > CONSISTENCY * params:
            raise EstimateError(f"--params {params:,} disagrees with --layers {layers} --hidden {hidden}"
                                f"{f' --vocab {vocab}' if vocab else ''} (12·nl·hd² + vocab·hd = {described:,});"
                                f" give one or the other, or make them agree within {CONSISTENCY:.0%}")
        if ci > layers:
            raise EstimateError(f"--ci {ci} must be at most --layers {layers} (a checkpoint every ci blocks)")
    elif heads is not None or vocab:
        raise EstimateError("--heads and --vocab describe a model; give them with --layers and --hidden")
    if largest_layer is None and hidden is not None:
        largest_layer = max(4 * hidden * hidden, (vocab or 0) * hidden)   # the hd→4hd linear, or the embedding
    n = gpus * nodes
    result = {
        "inputs": {"params": params, "layers": layers, "hidden": hidden, "heads": heads, "vocab": vocab or 0,
                   "largest_layer_params": largest_layer, "gpus_per_node": gpus, "nodes": nodes, "bsz": bsz,
                   "seq": seq, "ci": ci, "peak_tflops": peak_tflops,
                   "bw_gb_per_s": {"gpu_gpu": bw_gpu_gpu, "cpu_gpu": bw_cpu_gpu, "nvme": bw_nvme}},
        "world_size": n,
        "model_state_bytes": {"zero_16_per_param": (4 + K_ADAM) * params,
                              "paper_20_per_param": paper_model_state_bytes(params)},
        "zero": [],
        "deepspeed": {"zero2": [], "zero3": []},
        "activations": None,
    }
    for stage, opt, par in zero_configurations():
        rank = zero_model_state_bytes(params, stage, n, opt, par)
        result["zero"].append({"stage": stage, "offload_optimizer": opt, "offload_param": par, "per_rank": rank,
                               "per_node": {t: b * gpus for t, b in rank.items()}})
    for cpu_offload in (True, False):
        cpu, gpu = deepspeed_zero2_mem_needs(params, gpus, nodes, cpu_offload)
        result["deepspeed"]["zero2"].append({"offload_optimizer": "cpu" if cpu_offload else "none",
                                             "cpu_bytes_per_node": cpu, "gpu_bytes_per_gpu": gpu})
    if largest_layer is not None:
        for opt, par in ((True, True), (True, False), (False, False)):   # DeepSpeed's order; no param-only offload
            for zero_init in (True, False):
                cpu, gpu, _ = deepspeed_zero3_mem_needs(params, largest_layer, gpus, nodes, opt, par, zero_init)
                result["deepspeed"]["zero3"].append({
                    "offload_param": "cpu" if par else "none", "offload_optimizer": "cpu" if opt else "none",
                    "zero_init": zero_init, "cpu_bytes_per_node": cpu, "gpu_bytes_per_gpu": gpu})
    if hidden is not None:
        ckpt = activation_checkpoint_bytes(bsz, seq, hidden, layers, ci)
        act = {"checkpoints_per_gpu": ckpt, "checkpoints_per_node": ckpt * gpus,
               "mswm_per_gpu": model_state_working_memory_bytes(hidden), "awm_per_gpu": None}
        if heads is not None:
            act["awm_per_gpu"] = activation_working_memory_bytes(bsz, seq, hidden, heads, ci)
        result["activations"] = act
    peak = peak_tflops * 1e12
    bws = {"gpu_gpu": bw_gpu_gpu * 1e9, "cpu_gpu": bw_cpu_gpu * 1e9, "nvme": bw_nvme * 1e9}
    result["efficiency"] = [
        {"data": data, "ait": ait, "bw_for_50": bandwidth_for_efficiency(ait, 0.5, peak),
         "bw_for_90": bandwidth_for_efficiency(ait, 0.9, peak),
         "efficiency": {link: efficiency(ait, bw, peak) for link, bw in bws.items()}}
        for data, ait in arithmetic_intensity(bsz, seq, hidden, ci).items()]
    return result


# ---------------------------------------------------------------------------------------------- text
def format_bytes(b: float) -> str:
    """GB (2^30) below one TB (2^40), TB from there, two decimals."""
    return f"{b / 2**40:.2f} TB" if b >= 2**40 else f"{b / 2**30:.2f} GB"


def format_rate(bps: float) -> str:
    for unit, scale in (("TB/s", 1e12), ("GB/s", 1e9)):
        if bps >= scale:
            return f"{bps / scale:.2f} {unit}"
    return f"{bps / 1e6:.2f} MB/s"


def _table(headers: list[str], rows: list[list[str]], right_from: int) -> list[str]:
    """Plain aligned columns; columns from `right_from` on are numbers and right-aligned."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    def line(cells):
        return "  " + "  ".join(c.rjust(w) if i >= right_from else c.ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(headers), *(line(r) for r in rows)]


def format_report(r: dict) -> str:
    i, n = r["inputs"], r["world_size"]
    shape = ""
    if i["layers"]:
        vocab = f", vocab={i['vocab']}" if i["vocab"] else ""
        shape = f" (nl={i['layers']}, hd={i['hidden']}{vocab})"
    out = [f"Model: {i['params']:,} parameters{shape}; {i['gpus_per_node']} GPU(s) per node x {i['nodes']} "
           f"node(s) = {n} data-parallel ranks",
           "Bytes: GB = 2^30, TB = 2^40 (as DeepSpeed and the paper print them); bandwidth: GB/s = 1e9 bytes/s", "",
           "Model states, whole model (mixed-precision Adam)",
           f"  16 bytes/param, ZeRO Figure 1 (fp16 params + grads, fp32 master + momentum + variance): "
           f"{format_bytes(r['model_state_bytes']['zero_16_per_param'])}",
           f"  20 bytes/param, ZeRO-Infinity §3 (240·nl·hd², Figure 2a): "
           f"{format_bytes(r['model_state_bytes']['paper_20_per_param'])}", "",
           f"Model states per rank and per node, partitioned over N = {n} (ZeRO §5; K = {K_ADAM})"]
    rows = [[str(z["stage"]), z["offload_optimizer"], z["offload_param"],
             *(format_bytes(z["per_rank"][t]) for t in TIERS), *(format_bytes(z["per_node"][t]) for t in TIERS)]
            for z in r["zero"]]
    out += _table(["stage", "offload_optimizer", "offload_param", "GPU/rank", "CPU/rank", "NVMe/rank",
                   "GPU/node", "CPU/node", "NVMe/node"], rows, right_from=3)
    out += ["", "DeepSpeed estimate_zero2_model_states_mem_needs (stage_1_and_2.py); CPU per node, GPU per GPU",
            "  per CPU  |  per GPU |   Options"]
    out += [f" {d['cpu_bytes_per_node'] / 2**30:7.2f}GB | {d['gpu_bytes_per_gpu'] / 2**30:6.2f}GB | "
            f"offload_optimizer={d['offload_optimizer']:4}" for d in r["deepspeed"]["zero2"]]
    out += ["", "DeepSpeed estimate_zero3_model_states_mem_needs (stage3.py)"]
    if r["deepspeed"]["zero3"]:
        out[-1] += f"; largest layer {i['largest_layer_params']:,} params"
        out.append("  per CPU  |  per GPU |   Options")
        out += [f" {d['cpu_bytes_per_node'] / 2**30:7.2f}GB | {d['gpu_bytes_per_gpu'] / 2**30:6.2f}GB | "
                f"offload_param={d['offload_param']:4}, offload_optimizer={d['offload_optimizer']:4}, "
                f"zero_init={int(d['zero_init'])}" for d in r["deepspeed"]["zero3"]]
    else:
        out.append("  (needs the largest layer's size: give --largest-layer, or --layers and --hidden)")
    a = r["activations"]
    out += ["", f"Activations and working memory (ZeRO-Infinity §3; bsz={i['bsz']} per GPU, seq={i['seq']}, "
                f"ci={i['ci']})"]
    if a is None:
        out.append("  (needs the model's shape: give --layers and --hidden)")
    else:
        awm = "(give --heads)" if a["awm_per_gpu"] is None else format_bytes(a["awm_per_gpu"])
        awm_node = "" if a["awm_per_gpu"] is None else format_bytes(a["awm_per_gpu"] * i["gpus_per_node"])
        out += _table(["what", "formula (bytes)", "per GPU", "per node"], [
            ["activation checkpoints", "2·bsz·seq·hd·nl/ci", format_bytes(a["checkpoints_per_gpu"]),
             format_bytes(a["checkpoints_per_node"])],
            ["activation working memory (AWM)", "bsz·seq·ci·(16·hd + 2·heads·seq)", awm, awm_node],
            ["model-state working memory (MSWM)", "4·hd·4hd", format_bytes(a["mswm_per_gpu"]),
             format_bytes(a["mswm_per_gpu"] * i["gpus_per_node"])]], right_from=2)
    bw = i["bw_gb_per_s"]
    out += ["", f"Bandwidth and efficiency (ZeRO-Infinity §4; peak {i['peak_tflops']:g} TFLOP/s per GPU; "
                "bandwidth per GPU)"]
    names = {"params_grads": ("parameters + gradients", "seq·bsz"),
             "optimizer_states": ("optimizer states", "seq·bsz/4"),
             "activation_checkpoints": ("activation checkpoints", "24·hd·ci")}
    rows = [[*names[e["data"]], f"{e['ait']:,.0f}", format_rate(e["bw_for_50"]), format_rate(e["bw_for_90"]),
             *(f"{100 * e['efficiency'][link]:.1f}%" for link in DEFAULT_BW)] for e in r["efficiency"]]
    out += _table(["data", "ait =", "flop/byte", "bw for 50%", "bw for 90%",
                   *(f"@{BW_LABELS[k]} {bw[k]:g} GB/s" for k in DEFAULT_BW)], rows, right_from=2)
    if r["activations"] is None:
        out.append("  (activation checkpoints need --hidden)")
    return "\n".join(line.rstrip() for line in out)


# ---------------------------------------------------------------------------------------------- CLI
def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}; "
                                             "a positive value is needed") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text!r} must be positive (and finite)")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _count(text):
    try:
        return parse_count(text, "count")
    except EstimateError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("count: ")) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `refimpl estimate` flags (the CLI adds them to its subparser)."""
    pint, pfloat = _positive(int), _positive(float)
    m = p.add_argument_group("model (give --params, or --layers and --hidden, or all three if they agree)")
    m.add_argument("--params", type=_count, metavar="P", help="parameter count: 3e9, 3B, 175B, 1T")
    m.add_argument("--layers", type=pint, metavar="NL", help="transformer blocks (Ψ ≈ 12·nl·hd²)")
    m.add_argument("--hidden", type=pint, metavar="HD", help="hidden size")
    m.add_argument("--heads", type=pint, metavar="H", help="attention heads (for the activation working memory)")
    m.add_argument("--vocab", type=pint, metavar="V", help="vocabulary; adds a tied vocab·hd embedding to Ψ")
    m.add_argument("--largest-layer", type=_count, metavar="P",
                   help="parameters of the largest layer, for DeepSpeed's ZeRO-3 estimate (default 4·hd²)")
    h = p.add_argument_group("machine and batch")
    h.add_argument("--gpus", type=pint, default=1, metavar="N", help="GPUs per node (default 1)")
    h.add_argument("--nodes", type=pint, default=1, metavar="N", help="nodes (default 1)")
    h.add_argument("--bsz", type=pint, default=1, metavar="B", help="micro-batch per GPU (default 1)")
    h.add_argument("--seq", type=pint, default=1024, metavar="S", help="sequence length (default 1024)")
    h.add_argument("--ci", type=pint, default=1, metavar="CI",
                   help="blocks between activation checkpoints (default 1)")
    h.add_argument("--peak-tflops", type=pfloat, default=DEFAULT_PEAK_TFLOPS, metavar="T",
                   help=f"achievable peak per GPU, TFLOP/s (default {DEFAULT_PEAK_TFLOPS:g}, a V100 as in the paper)")
    for key, flag in (("gpu_gpu", "--bw-gpu-gpu"), ("cpu_gpu", "--bw-cpu-gpu"), ("nvme", "--bw-nvme")):
        h.add_argument(flag, type=pfloat, default=DEFAULT_BW[key], metavar="GB/s",
                       help=f"{BW_LABELS[key]} bandwidth per GPU, GB/s (default {DEFAULT_BW[key]:g})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def run(args: argparse.Namespace) -> int:
    """Run `refimpl estimate` on parsed arguments; bad combinations are one line on stderr and exit code 2."""
    try:
        result = estimate(params=args.params, layers=args.layers, hidden=args.hidden, heads=args.heads,
                          vocab=args.vocab or 0, largest_layer=args.largest_layer, gpus=args.gpus,
                          nodes=args.nodes, bsz=args.bsz, seq=args.seq, ci=args.ci, peak_tflops=args.peak_tflops,
                          bw_gpu_gpu=args.bw_gpu_gpu, bw_cpu_gpu=args.bw_cpu_gpu, bw_nvme=args.bw_nvme)
    except EstimateError as exc:
        print(f"refimpl estimate: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="refimpl estimate", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
