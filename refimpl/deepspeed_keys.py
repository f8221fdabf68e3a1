"""DeepSpeed's config keys that refimpl knows but does not act on (DeepSpeed 0.19.8's schema).

A DeepSpeed user's config works unchanged in refimpl. Every key DeepSpeed knows, in the sections refimpl reads,
is one of:
- **honoured**: in ``refimpl.config.SCHEMA``, with DeepSpeed's name, meaning and default;
- **renamed**: another spelling DeepSpeed accepts for an honoured key (``RENAMED``: pydantic field names beside
  their ``stage3_`` aliases, deprecated names, ``bfloat16`` for ``bf16``);
- **no effect** (``KNOWN``, ``strict=False``): a profiler, a logger, a performance knob, a feature refimpl does not
  model. It is accepted with one warning that names it (none when it holds DeepSpeed's default);
- **strict** (``KNOWN``, ``strict=True``): a feature that changes the numbers (quantized collectives, fp16 master
  weights, summed instead of averaged gradients). Its DeepSpeed default is accepted; any other value is an
  error that says refimpl does not implement it.

Any other key is an error. (DeepSpeed's pydantic sections reject unknown keys too; at the top level DeepSpeed
ignores them silently, which hides typos such as ``gradient_clippping``.) The config parser (``config.py``) removes
the keys listed here from the resolved config; ``deepspeed_only(raw)`` returns them as given, so a cross-check can
hand DeepSpeed the user's settings unchanged. ``tests/test_deepspeed_semantics.py`` checks these tables against
the installed DeepSpeed's own config models.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any


class DeepSpeedKeyWarning(UserWarning):
    """A DeepSpeed config key that refimpl accepts but does not act on."""


class _Any:
    def __repr__(self):
        return "ANY"


NO_DEFAULT = _Any()   # a key whose every value warns (a whole section such as "tensorboard")


@dataclass(frozen=True)
class Known:
    why: str
    default: Any = NO_DEFAULT
    strict: bool = False


_PERF = "a performance knob of DeepSpeed's implementation; refimpl's numbers do not depend on it"
_NOT_MODELLED = "a DeepSpeed feature refimpl does not model"
_LOGGING = "logging/profiling in DeepSpeed; refimpl writes metrics.jsonl and ledger.jsonl instead"

KNOWN: dict[str, Known] = {
    # ---- top level (deepspeed/runtime/config.py DeepSpeedConfig._initialize_params and the feature configs)
    "steps_per_print": Known(_LOGGING + " (refimpl: run.log_interval)", None),
    "wall_clock_breakdown": Known(_LOGGING, False),
    "memory_breakdown": Known(_LOGGING, False),
    "dump_state": Known(_LOGGING, False),
    "flops_profiler": Known(_LOGGING),
    "comms_logger": Known(_LOGGING),
    "tensorboard": Known(_LOGGING), "wandb": Known(_LOGGING), "csv_monitor": Known(_LOGGING),
    "comet": Known(_LOGGING),
    "timers": Known(_LOGGING),
    "log_level": Known(_LOGGING),
    "disable_python_gc": Known(_PERF),
    "disable_allgather": Known(_PERF, False),
    "managed_gradient_accumulation": Known(_PERF),
    "communication_data_type": Known("refimpl reduces fp16/bf16 gradients in fp32 and rounds once", None),
    "seq_parallel_communication_data_type": Known(_NOT_MODELLED + " (sequence parallelism)", "fp32"),
    "prescale_gradients": Known("refimpl divides by the world size right after the reduction", False),
    "gradient_predivide_factor": Known("refimpl divides by the world size right after the reduction", 1.0),
    "gradient_allreduce_op": Known("refimpl averages gradients over ranks", "mean", strict=True),
    "data_types": Known("refimpl accumulates gradients in the parameters' dtype and reduces them in fp32"),
    "zero_allow_untested_optimizer": Known("refimpl has one optimizer, Adam(W)", False),
    "zero_force_ds_cpu_optimizer": Known("refimpl's offloaded optimizer is always its own host AdamW", True),
    "checkpoint": Known("refimpl's checkpoints are safetensors + a JSON manifest (refimpl/checkpoint.py)"),
    "datastates_ckpt": Known("refimpl's checkpoints are safetensors + a JSON manifest (refimpl/checkpoint.py)"),
    "dataloader_drop_last": Known("refimpl's batches come from refimpl.data", False),
    "vocabulary_size": Known("refimpl takes the vocabulary from model.vocab_size / the dataset"),
    "autotuning": Known(_NOT_MODELLED), "elasticity": Known(_NOT_MODELLED),
    "compile": Known(_NOT_MODELLED + " (torch.compile)"),
    "hybrid_engine": Known(_NOT_MODELLED), "pipeline": Known(_NOT_MODELLED + " (pipeline parallelism)"),
    "tensor_parallel": Known(_NOT_MODELLED + " (tensor parallelism)"),
    "expert_parallel": Known(_NOT_MODELLED + " (mixture of experts)"),
    "use_data_before_expert_parallelism": Known(_NOT_MODELLED + " (mixture of experts)", False),
    "sequence_parallel_size": Known(_NOT_MODELLED + " (sequence parallelism)", 1),
    "mics_shard_size": Known(_NOT_MODELLED + " (MiCS)", -1, strict=True),
    "mics_hierarchical_params_gather": Known(_NOT_MODELLED + " (MiCS)", False),
    "data_efficiency": Known(_NOT_MODELLED + " (curriculum / data routing)"),
    "curriculum_learning": Known(_NOT_MODELLED + " (curriculum learning)"),
    "sparse_attention": Known(_NOT_MODELLED + " (sparse attention kernels)"),
    "weight_quantization": Known(_NOT_MODELLED + " (weight quantization)"),
    "compression_training": Known(_NOT_MODELLED + " (compression)"),
    "quantize_training": Known(_NOT_MODELLED + " (quantized training)"),
    "progressive_layer_drop": Known(_NOT_MODELLED + " (progressive layer drop)"),
    "eigenvalue": Known(_NOT_MODELLED + " (eigenvalue computation)"),
    "nebula": Known(_NOT_MODELLED + " (Nebula checkpointing)"),
    "zenflow": Known(_NOT_MODELLED + " (ZenFlow)"),
    # features that change the numbers: only DeepSpeed's default (off) is accepted
    "amp.enabled": Known("NVIDIA Apex AMP changes the arithmetic; refimpl implements fp16/bf16 sections only",
                         False, strict=True),
    "amp": Known("NVIDIA Apex AMP options (off here)"),
    "torch_autocast.enabled": Known("torch.autocast changes the arithmetic; refimpl implements fp16/bf16 sections "
                                    "only", False, strict=True),
    "torch_autocast": Known("torch.autocast options (off here)"),
    # ---- optimizer: DeepSpeed pops adam_w_mode/torch_adam/fp32_optimizer_states and hands the rest of params to
    # FusedAdam, DeepSpeedCPUAdam or torch.optim.Adam(W) (deepspeed/runtime/engine.py _configure_basic_optimizer)
    "optimizer.legacy_fusion": Known(_PERF, False),
    "optimizer.params.max_grad_norm": Known("DeepSpeed rejects it too: use the top-level gradient_clipping",
                                            strict=True),
    "optimizer.params.amsgrad": Known("AMSGrad is not implemented", False, strict=True),
    "optimizer.params.maximize": Known("refimpl minimises the loss", False, strict=True),
    "optimizer.params.fp32_optimizer_states": Known("refimpl keeps fp32 Adam moments", True, strict=True),
    "optimizer.params.set_grad_none": Known(_PERF, True),
    "optimizer.params.foreach": Known(_PERF + " (torch_adam)", None),
    "optimizer.params.fused": Known(_PERF + " (torch_adam)", None),
    "optimizer.params.capturable": Known(_PERF + " (torch_adam)", False),
    "optimizer.params.differentiable": Known(_PERF + " (torch_adam)", False),
    # ---- fp16 / bf16 (deepspeed/runtime/precision_config.py)
    "fp16.auto_cast": Known("refimpl's model takes integer token ids: there is nothing to cast", False),
    "fp16.fp16_master_weights_and_grads": Known("refimpl keeps fp32 master weights", False, strict=True),
    "bf16.immediate_grad_update": Known(_PERF, False),
    "bf16.check_grad_overflow": Known("refimpl skips every step whose gradients hold inf/nan", True, strict=True),
    "bf16.bf16_master_weights_and_grads": Known("refimpl keeps fp32 master weights", False, strict=True),
    "bf16.bf16_optimizer_states": Known("refimpl keeps fp32 Adam moments", False, strict=True),
    # ---- zero_optimization (deepspeed/runtime/zero/config.py DeepSpeedZeroConfig)
    "zero_optimization.contiguous_gradients": Known(_PERF, True),
    "zero_optimization.overlap_comm": Known(_PERF + " (refimpl's overlap is the prefetcher and the copy stream)"),
    "zero_optimization.reduce_scatter": Known(_PERF, True),
    "zero_optimization.use_multi_rank_bucket_allreduce": Known(_PERF, True),
    "zero_optimization.allgather_partitions": Known(_PERF, True),
    "zero_optimization.allgather_bucket_size": Known(_PERF, 500_000_000),
    "zero_optimization.round_robin_gradients": Known(_PERF, False),
    "zero_optimization.compute_grad_norm": Known("refimpl always computes the global gradient norm", True,
                                                 strict=True),
    "zero_optimization.load_from_fp32_weights": Known("refimpl's checkpoints always restore the fp32 master", True),
    "zero_optimization.elastic_checkpoint": Known("refimpl's checkpoints load at any world size", False),
    "zero_optimization.stage3_model_persistence_threshold": Known(
        "refimpl keeps parameters under stage3_param_persistence_threshold whole, without a model-wide cap"),
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": Known(
        "refimpl's checkpoints always hold the whole 16-bit weights (model.safetensors)", False),
    "zero_optimization.stage3_module_granularity_threshold": Known(_PERF, 0),
    "zero_optimization.stage3_use_all_reduce_for_fetch_params": Known(_PERF, False),
    "zero_optimization.stage3_allgather_sequential": Known(_PERF, False),
    "zero_optimization.ignore_unused_parameters": Known("refimpl's model uses every parameter", True),
    "zero_optimization.legacy_stage1": Known(_NOT_MODELLED, False),
    "zero_optimization.parameter_alignment": Known(_PERF, False),
    "zero_optimization.zero_hpz_partition_size": Known(_NOT_MODELLED + " (ZeRO++ hpZ)", 1, strict=True),
    "zero_optimization.zero_quantized_weights": Known(_NOT_MODELLED + " (ZeRO++ qwZ)", False, strict=True),
    "zero_optimization.zero_quantized_nontrainable_weights": Known(_NOT_MODELLED + " (ZeRO++)", False, strict=True),
    "zero_optimization.zero_quantized_gradients": Known(_NOT_MODELLED + " (ZeRO++ qgZ)", False, strict=True),
    "zero_optimization.memory_efficient_linear": Known(_PERF, True),
    "zero_optimization.pipeline_loading_checkpoint": Known(_PERF, False),
    "zero_optimization.override_module_apply": Known(_PERF, True),
    "zero_optimization.log_trace_cache_warnings": Known(_LOGGING, False),
    "zero_optimization.enable_sanity_checks": Known(_LOGGING, False),
    "zero_optimization.save_muon_momentum_buffer_in_memory": Known(_NOT_MODELLED + " (Muon)", False),
    "zero_optimization.leaf_module": Known(_NOT_MODELLED + " (ZeRO-3 leaf modules)"),
    "zero_optimization.zenflow": Known(_NOT_MODELLED + " (ZenFlow)", None),
    "zero_optimization.cpu_offload_use_pin_memory": Known(_PERF + " (deprecated in DeepSpeed)", None),
    "zero_optimization.stage3_gather_fp16_weights_on_model_save": Known(
        "refimpl's checkpoints always hold the whole 16-bit weights (deprecated in DeepSpeed)", False),
    # ---- offload sections (deepspeed/runtime/zero/offload_config.py)
    "zero_optimization.offload_param.max_in_cpu": Known(_PERF, 1_000_000_000),
    "zero_optimization.offload_param.pin_memory": Known(_PERF + " (refimpl pins host buffers on GPU backends)", True),
    "zero_optimization.offload_optimizer.pin_memory": Known(_PERF + " (refimpl pins host buffers on GPU backends)",
                                                            True),
    "zero_optimization.offload_optimizer.pipeline_read": Known(_PERF + " (refimpl always pipelines sub-groups)",
                                                               False),
    "zero_optimization.offload_optimizer.pipeline_write": Known(_PERF + " (refimpl always pipelines sub-groups)",
                                                                False),
    "zero_optimization.offload_optimizer.fast_init": Known(_PERF, False),
    "zero_optimization.offload_optimizer.super_offload": Known(_NOT_MODELLED + " (SuperOffload)", False,
                                                               strict=True),
    "zero_optimization.offload_optimizer.cpuadam_cores_perc": Known(_PERF, 0.8),
    # ---- activation_checkpointing (deepspeed/runtime/activation_checkpointing/config.py)
    "activation_checkpointing.partition_activations": Known(_NOT_MODELLED + " (model parallelism)", False),
    "activation_checkpointing.contiguous_memory_optimization": Known(_PERF, False),
    "activation_checkpointing.number_checkpoints": Known(_PERF, None),
    "activation_checkpointing.synchronize_checkpoint_boundary": Known(_PERF, False),
    "activation_checkpointing.profile": Known(_LOGGING, False),
    # ---- aio (deepspeed/runtime/swap_tensor/aio_config.py)
    "aio.single_submit": Known(_PERF, False),
    "aio.overlap_events": Known(_PERF, True),
    "aio.use_gds": Known(_NOT_MODELLED + " (GPUDirect Storage)", False),
}

# Other spellings DeepSpeed accepts for honoured keys: path -> (canonical path, note). The pydantic field names
# (populate_by_name=True) stand beside their stage3_ aliases; deprecated names are translated as DeepSpeed does.
RENAMED: dict[str, tuple[str, str]] = {
    "bfloat16": ("bf16", "DeepSpeed's old name of the section"),
    "aio.thread_count": ("aio.intra_op_parallelism", "DeepSpeed's old name"),
    **{f"zero_optimization.{name}": (f"zero_optimization.stage3_{name}", "the pydantic field name of the alias")
       for name in ("prefetch_bucket_size", "param_persistence_threshold", "max_live_parameters",
                    "max_reuse_distance")},
    "zero_optimization.model_persistence_threshold": ("zero_optimization.stage3_model_persistence_threshold",
                                                      "the pydantic field name of the alias"),
    "zero_optimization.gather_16bit_weights_on_model_save": (
        "zero_optimization.stage3_gather_16bit_weights_on_model_save", "the pydantic field name of the alias"),
    "zero_optimization.module_granularity_threshold": ("zero_optimization.stage3_module_granularity_threshold",
                                                       "the pydantic field name of the alias"),
    "zero_optimization.use_all_reduce_for_fetch_params": ("zero_optimization.stage3_use_all_reduce_for_fetch_params",
                                                          "the pydantic field name of the alias"),
    "zero_optimization.allgather_sequential": ("zero_optimization.stage3_allgather_sequential",
                                               "the pydantic field name of the alias"),
}

# Deprecated booleans DeepSpeed turns into offload sections (DeepSpeedZeroConfig's new_param_fn)
DEPRECATED_OFFLOAD = {"zero_optimization.cpu_offload": "zero_optimization.offload_optimizer",
                      "zero_optimization.cpu_offload_param": "zero_optimization.offload_param"}


def _pop_path(layer, path):
    """Remove ``a.b.c`` from a nested dict layer; (found, value). Parents are copied, never changed in place."""
    *parents, last = path.split(".")
    node = layer
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        return False, None
    return True, node.pop(last)


def _put_path(layer, path, value, old_path, error):
    *parents, last = path.split(".")
    node = layer
    for key in parents:
        node = node.setdefault(key, {})
    if last in node and node[last] != value:
        raise error(old_path, f"is another name of {path}; both are given and differ ({value!r} vs "
                                    f"{node[last]!r})")
    node[last] = value


def normalise_spellings(layer, error):
    """A copy of one config layer with DeepSpeed's other spellings of honoured keys written as refimpl's (RENAMED:
    ``prefetch_bucket_size`` -> ``stage3_prefetch_bucket_size``, ``aio.thread_count`` -> ``aio.intra_op_parallelism``,
    ...) and DeepSpeed's deprecated ``cpu_offload`` / ``cpu_offload_param`` turned into offload sections. A clash
    raises ``error(path, detail)``."""
    if not isinstance(layer, dict):
        return layer
    layer = copy.deepcopy(layer)
    for old, (new, _) in RENAMED.items():
        found, value = _pop_path(layer, old)
        if found:
            _put_path(layer, new, value, old, error)
    for old, new in DEPRECATED_OFFLOAD.items():
        found, value = _pop_path(layer, old)
        if not found:
            continue
        if not isinstance(value, bool):
            raise error(old, f"must be true or false, got {type(value).__name__} {value!r}")
        if value:
            if _pop_path(copy.deepcopy(layer), new)[0]:   # DeepSpeed asserts the same
                raise error(old, f"is DeepSpeed's deprecated form of {new}; give only one of them")
            _put_path(layer, new, {"device": "cpu"}, old, error)
    return layer


def lookup(path: str) -> Known | None:
    return KNOWN.get(path)


def _is_default(value, default) -> bool:
    if default is NO_DEFAULT:
        return False
    if isinstance(default, bool) or isinstance(value, bool):
        return value is default
    return value == default


def check_known(path: str, value, error) -> None:
    """A DeepSpeed key refimpl does not act on: warn, or raise ``error(path, detail)`` for a strict one.

    For a section (``amp``, ``torch_autocast``) the strict keys under it are checked first."""
    if isinstance(value, dict):
        for key, sub in value.items():
            entry = KNOWN.get(f"{path}.{key}")
            if entry is not None and entry.strict:
                check_known(f"{path}.{key}", sub, error)
    entry = KNOWN[path]
    if _is_default(value, entry.default):
        return
    if entry.strict and entry.default is NO_DEFAULT:
        raise error(path, f"is not accepted: {entry.why}")
    if entry.strict:
        raise error(path, f"{value!r} is not supported in refimpl ({entry.why}); allowed: {entry.default!r} "
                          f"(DeepSpeed's default)")
    if isinstance(value, dict) and entry.default is NO_DEFAULT and not value:
        return   # an empty section asks for nothing
    warnings.warn(f"{path}: DeepSpeed key with no effect in refimpl: {entry.why}", DeepSpeedKeyWarning,
                  stacklevel=4)


def deepspeed_only(raw: dict, prefix: str = "") -> dict:
    """The keys of a raw (merged, unvalidated) config that DeepSpeed knows and refimpl only accepts: path -> value."""
    out = {}
    for key, value in raw.items() if isinstance(raw, dict) else ():
        path = f"{prefix}.{key}" if prefix else str(key)
        if path in KNOWN:
            out[path] = value
        elif isinstance(value, dict):
            out.update(deepspeed_only(value, path))
    return out
