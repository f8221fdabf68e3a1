"""Run configuration: one dict, DeepSpeed's key names and meanings, strict validation.

A DeepSpeed user's JSON config works unchanged: the batch-size keys, ``gradient_clipping``, ``optimizer``,
``scheduler``, ``fp16``, ``bf16``, ``zero_optimization``, ``activation_checkpointing`` and ``aio`` sections
keep DeepSpeed's names and defaults (DeepSpeed "Configuration JSON", https://www.deepspeed.ai/docs/config-json/;
deepspeed/runtime/lr_schedules.py for the schedulers). Our own sections are ``model``, ``data``, ``backend``,
``world_size`` and ``run``.

A config is built in layers, later ones win key by key:
    DEFAULT_CONFIG  <-  a .json / .toml file  <-  ``--set a.b.c=VALUE`` overrides
``validate`` then checks every key against ``SCHEMA`` (a nested dict of key -> ``Field(default, check)``),
fills in defaults, resolves derived values (``d_head``, ``d_ff``, ``"auto"`` step counts, seeds,
``train_batch_size``) and applies the limits of this version (the ``SUPPORTED_*`` constants). Every error is a
``ConfigError`` whose message starts with the key path, so a typo in a long config points at its line.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import re
import os
import stat
import tomllib
from dataclasses import dataclass
from typing import Any, Callable

from . import deepspeed_keys

__all__ = ["ConfigError", "DEFAULT_CONFIG", "SCHEMA", "load_config", "merge_layers", "validate", "parse_override", "dumps",
           "SUPPORTED_ZERO_STAGES", "SUPPORTED_OFFLOAD_DEVICES"]

# What this version implements of what DeepSpeed accepts. Widen these as the features land.
SUPPORTED_ZERO_STAGES = (0, 1, 2, 3)
# offload devices implemented so far, per section (DeepSpeed: "none", "cpu", "nvme" for both)
SUPPORTED_OFFLOAD_DEVICES = {"offload_param": ("none", "cpu", "nvme"), "offload_optimizer": ("none", "cpu", "nvme")}
OFFLOAD_MIN_STAGE = {"offload_param": 3, "offload_optimizer": 1}   # DeepSpeed's rules


class ConfigError(ValueError):
    """A bad config. ``key_path`` is the dotted key ("optimizer.params.lr"); for a file that cannot be read
    or parsed it is the file's path. The message always starts with ``key_path``."""

    def __init__(self, key_path: str, detail: str):
        self.key_path, self.detail = key_path, detail
        super().__init__(f"{key_path}: {detail}" if key_path else detail)


# ---------------------------------------------------------------------------------------------------------
# Checkers: check(path, value) -> the normalised value, or raise ConfigError naming the path
# ---------------------------------------------------------------------------------------------------------

def _show(v) -> str:
    return "null" if v is None else f"{type(v).__name__} {v!r}"


MAX_WORLD_SIZE = 1024
MAX_INT = 2**53      # the largest integer JSON round-trips exactly; nothing refimpl counts comes near it


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)   # True is an int in Python, never in a config


def _in_range(path, v, lo=None, hi=None, lo_open=False, hi_open=False):
    too_low = lo is not None and (v <= lo if lo_open else v < lo)
    too_high = hi is not None and (v >= hi if hi_open else v > hi)
    if too_low or too_high:
        if lo is not None and hi is not None:
            what = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        elif lo is not None:
            what = f"{'>' if lo_open else '>='} {lo}"
        else:
            what = f"{'<' if hi_open else '<='} {hi}"
        raise ConfigError(path, f"must be {what}, got {v!r}")
    return v


def integer(lo=None, hi=None):
    def check(path, v):
        if not _is_int(v):
            raise ConfigError(path, f"must be an int, got {_show(v)[:80]}")
        if abs(v) > MAX_INT:
            raise ConfigError(path, f"must be an int of magnitude at most 2**53, got one of {len(str(abs(v)))} "
                                    f"digits")
        return _in_range(path, v, lo, hi)
    return check


def size(lo=0):
    """A byte or element count. DeepSpeed configs write these as 5e8, which JSON reads as a float."""
    def check(path, v):
        return integer(lo)(path, int(v) if isinstance(v, float) and v.is_integer() else v)
    return check


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def byte_size(path, v):
    """Bytes as an int or a string with a unit: 268435456, "256MB", "1.5 GiB" (MB = 10^6, MiB = 2^20)."""
    if isinstance(v, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", v)
        if not m or m.group(2).upper() not in _UNITS:
            raise ConfigError(path, f"must be a byte count like 268435456, \"256MB\" or \"1.5GiB\", got {_show(v)}")
        v = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    return size(1)(path, v)


def multiple_of(n, check_first):
    """``check_first``, then a multiple of n (aio.block_size: O_DIRECT's 4096-byte alignment)."""
    def check(path, v):
        v = check_first(path, v)
        if v % n:
            raise ConfigError(path, f"must be a multiple of {n} (the O_DIRECT alignment), got {v}")
        return v
    return check


def number(lo=None, hi=None, lo_open=False, hi_open=False):
    def check(path, v):
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            raise ConfigError(path, f"must be a finite number, got {_show(v)}")
        return float(_in_range(path, v, lo, hi, lo_open, hi_open))
    return check


def boolean(path, v):
    if not isinstance(v, bool):
        raise ConfigError(path, f"must be true or false, got {_show(v)}")
    return v


def string(path, v):
    if not isinstance(v, str) or not v:
        raise ConfigError(path, f"must be a non-empty string, got {_show(v)}")
    return v


def one_of(*allowed, ignore_case=False):
    """One of ``allowed`` (same type, so True is not 1); returns the canonical spelling."""
    def check(path, v):
        for a in allowed:
            if type(v) is type(a) and (v == a or (ignore_case and v.lower() == a.lower())):
                return a
        raise ConfigError(path, f"got {_show(v)}; allowed: {', '.join(map(repr, allowed))}")
    return check


def nullable(check):
    return lambda path, v: None if v is None else check(path, v)


def pair(item):
    def check(path, v):
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise ConfigError(path, f"must be a list of two numbers, got {_show(v)}")
        return [item(f"{path}[{i}]", x) for i, x in enumerate(v)]
    return check


def steps_or_auto(path, v):
    if isinstance(v, str) and v == "auto":   # resolved to run.steps
        return v
    if not _is_int(v):
        raise ConfigError(path, f"must be an int or \"auto\" (= run.steps), got {_show(v)}")
    return _in_range(path, v, 0)


def section(schema):
    return lambda path, v: _validate_section(schema, v, path)


@dataclass(frozen=True)
class Field:
    default: Any
    check: Callable[[str, Any], Any]


class _Required:
    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()   # a Field default meaning "no default: the key must be given"


# ---------------------------------------------------------------------------------------------------------
# The schema. A plain dict is a section that is always present; Field(None, nullable(section(...))) is an
# optional one (DeepSpeed's offload blocks). Defaults are DeepSpeed's for DeepSpeed's keys.
# ---------------------------------------------------------------------------------------------------------

_WARMUP = {"warmup_min_lr": Field(0.0, number(0)),
           "warmup_max_lr": Field(None, nullable(number(0))),    # null: the optimizer's lr (DeepSpeed)
           "warmup_num_steps": Field(1000, integer(1)),
           "warmup_type": Field("log", one_of("log", "linear"))}
SCHEDULER_PARAMS = {
    "WarmupLR": _WARMUP,
    # DeepSpeed's WarmupDecayLR signature defaults warmup_max_lr to 0.001, not to the optimizer's lr.
    "WarmupDecayLR": {**_WARMUP, "warmup_max_lr": Field(0.001, number(0)),
                      "total_num_steps": Field(REQUIRED, steps_or_auto)},
    "WarmupCosineLR": {"total_num_steps": Field(REQUIRED, steps_or_auto),
                       "warmup_min_ratio": Field(0.0, number(0, 1)),
                       "warmup_num_steps": Field(1000, integer(1)),
                       "cos_min_ratio": Field(0.0001, number(0, 1)),
                       "warmup_type": Field("log", one_of("log", "linear"))},
}


def _check_scheduler(path, v):
    """A scheduler's params schema depends on its type, so this section is checked by hand."""
    if not isinstance(v, dict):
        raise ConfigError(path, f"must be null or a table with 'type' and 'params', got {_show(v)}")
    for key in v:
        if key not in ("type", "params"):
            _unknown_key(path, key, ("type", "params"))
    kind = one_of(*SCHEDULER_PARAMS)(f"{path}.type", v.get("type"))
    return {"type": kind, "params": _validate_section(SCHEDULER_PARAMS[kind], v.get("params", {}), f"{path}.params")}


_OFFLOAD_DEVICE = Field("none", one_of("none", "cpu", "nvme"))
OFFLOAD_PARAM = {"device": _OFFLOAD_DEVICE, "nvme_path": Field(None, nullable(string)),
                 "buffer_count": Field(5, integer(1)), "buffer_size": Field(1e8, size(1))}
OFFLOAD_OPTIMIZER = {"device": _OFFLOAD_DEVICE, "nvme_path": Field(None, nullable(string)),
                     "buffer_count": Field(4, integer(1)),
                     "ratio": Field(1.0, number(0, 1))}   # Twin-Flow: the fraction offloaded (stage 3)

SCHEMA = {
    # the batch sizes: any two determine the third, as in DeepSpeed (null: derived; see _resolve_batch_sizes)
    "train_batch_size": Field(None, nullable(integer(1))),
    "train_micro_batch_size_per_gpu": Field(None, nullable(integer(1))),
    "gradient_accumulation_steps": Field(None, nullable(integer(1))),
    "gradient_clipping": Field(1.0, number(0)),             # 0 = off; DeepSpeed's default is 1.0
    "optimizer": {
        "type": Field("AdamW", one_of("AdamW", "Adam", ignore_case=True)),
        # DeepSpeed's FusedAdam / DeepSpeedCPUAdam defaults. Decoupled weight decay (AdamW) unless type is "Adam"
        # and adam_w_mode is false (refimpl.optim.adam_w_mode); weight_decay null: 0.0, or torch.optim.AdamW's
        # 0.01 with torch_adam.
        "params": {"lr": Field(1e-3, number(0, lo_open=True)),
                   "betas": Field([0.9, 0.999], pair(number(0, 1, hi_open=True))),
                   "eps": Field(1e-8, number(0, lo_open=True)),
                   "weight_decay": Field(None, nullable(number(0))),
                   "adam_w_mode": Field(True, boolean),
                   "torch_adam": Field(False, boolean),
                   "bias_correction": Field(True, boolean)},
    },
    "scheduler": Field(None, nullable(_check_scheduler)),
    "fp16": {"enabled": Field(False, boolean),
             "loss_scale": Field(0.0, number(0)),            # 0 = dynamic loss scaling
             "initial_scale_power": Field(16, integer(0)),
             "loss_scale_window": Field(1000, integer(1)),
             "hysteresis": Field(2, integer(1)),
             "consecutive_hysteresis": Field(False, boolean),
             "min_loss_scale": Field(1.0, number(0, lo_open=True))},
    "bf16": {"enabled": Field(False, boolean)},
    # The DeepSpeed keys refimpl accepts without acting on them are in refimpl/deepspeed_keys.py.
    "zero_optimization": {
        "stage": Field(0, integer()),                        # the supported set is SUPPORTED_ZERO_STAGES
        "reduce_bucket_size": Field(5e8, size(1)),
        "sub_group_size": Field(1e9, size(1)),
        "stage3_prefetch_bucket_size": Field(5e7, size(0)),
        "stage3_param_persistence_threshold": Field(1e5, size(0)),
        "stage3_max_live_parameters": Field(1e9, size(0)),
        "stage3_max_reuse_distance": Field(1e9, size(0)),
        "offload_param": Field(None, nullable(section(OFFLOAD_PARAM))),
        "offload_optimizer": Field(None, nullable(section(OFFLOAD_OPTIMIZER))),
    },
    "activation_checkpointing": {"cpu_checkpointing": Field(False, boolean)},
    "aio": {"block_size": Field(1048576, multiple_of(4096, size(1))), "queue_depth": Field(8, integer(1)),
            "intra_op_parallelism": Field(1, integer(1)),    # old name: thread_count
            # refimpl's own: the NVMe store. "aio": O_DIRECT requests on I/O threads (DeepNVMe, fast);
            # "mmap": numpy.memmap files (the readable reference). refimpl/memory/store.py
            "engine": Field("aio", one_of("aio", "mmap"))},
    # null: REFIMPL_BACKEND, else numpy. The backend registry checks the name at run time.
    "backend": Field(None, nullable(string)),
    # ranks; under mpiexec the MPI world decides. Simulated ranks are threads of one process: at most 1024.
    "world_size": Field(1, integer(1, MAX_WORLD_SIZE)),
    # byte budgets per rank (refimpl's own section): null = unlimited. On CPU backends the "device" is a RAM
    # region, so memory.device_bytes=256MB makes a laptop play a 256 MB GPU (model states + gathered parameters)
    "memory": {"device_bytes": Field(None, nullable(byte_size)), "host_bytes": Field(None, nullable(byte_size))},
    "model": {
        "task": Field("lm", one_of("lm", "classify")),
        "n_layers": Field(2, integer(1)), "n_heads": Field(4, integer(1)), "d_model": Field(128, integer(1)),
        "d_head": Field(None, nullable(integer(1))),         # null: d_model // n_heads
        "d_ff": Field(None, nullable(integer(1))),           # null: 4 * d_model
        "max_seq_len": Field(128, integer(1)),
        "vocab_size": Field(None, nullable(integer(1))),     # null: from the dataset
        "n_classes": Field(None, nullable(integer(2))),      # null: from the dataset
        "attention": Field("plain", one_of("plain", "tiled")),
        "attention_block_size": Field(64, integer(1)),
        "layernorm_eps": Field(1e-5, number(0, lo_open=True)),
        "init_std": Field(0.02, number(0, lo_open=True)),
        # parameters, activations and optimizer states when fp16/bf16 are off; float64 is the rounding-free
        # reference a cross-check arbitrates with (the weights start from the same fp32-rounded draw)
        "dtype": Field("float32", one_of("float32", "float64")),
        "tie_embeddings": Field(False, boolean),
        # memory-centric tiling: each MLP linear as an mlp_tiles x mlp_tiles grid of separately gathered tiles
        "mlp_tiles": Field(1, integer(1)),
        # recompute each block in backward from its input (activation checkpointing; see activation_checkpointing.*)
        "checkpoint_activations": Field(False, boolean),
    },
    "data": {
        "dataset": Field("stdlib_bytes", one_of("stdlib_bytes", "listops", "stdlib_packages", "p5_synthetic")),
        "seq_len": Field(128, integer(1)),
        "path": Field(None, nullable(string)),
        "max_bytes": Field(4_000_000, integer(1)),
        "val_fraction": Field(0.1, number(0, 0.5, lo_open=True)),   # the range refimpl.data accepts
        "n_train": Field(2000, integer(1)), "n_val": Field(200, integer(1)),
        "max_depth": Field(4, integer(1)), "max_args": Field(5, integer(2)),
        "min_length": Field(8, integer(1)), "max_length": Field(64, integer(1)),
        "seed": Field(None, nullable(integer(0))),           # null: run.seed
    },
    "run": {
        "steps": Field(300, integer(0)), "seed": Field(1234, integer(0)),
        "eval_interval": Field(50, integer(1)), "eval_batches": Field(8, integer(1)),
        "log_interval": Field(10, integer(1)),
        "checkpoint_interval": Field(None, nullable(integer(1))),   # null: only at the end
        "out": Field(None, nullable(string)),
        # seconds a collective may wait for the other ranks before the job ends with an error
        "comm_timeout": Field(300.0, number(0, lo_open=True)),
    },
}

# The default run, on top of the schema defaults. The model size and schedule are tuned here.
DEFAULT_RUN = {
    "train_micro_batch_size_per_gpu": 16,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.01}},
    "scheduler": {"type": "WarmupCosineLR",
                  "params": {"total_num_steps": "auto", "warmup_num_steps": 30, "warmup_type": "linear",
                             "cos_min_ratio": 0.1}},
    "model": {"task": "lm", "n_layers": 2, "n_heads": 8, "d_model": 128, "max_seq_len": 128},  # wide: 8 heads of 16
    "data": {"dataset": "stdlib_bytes", "seq_len": 128},
    "run": {"steps": 300},
}
# What `refimpl train` runs when no --config file is given: the default run above as ZeRO-Infinity. Four simulated
# ranks at stage 3 (every parameter partitioned), parameters and optimizer states on the NVMe tier in the run
# directory (a relative nvme_path is taken inside the run directory), and a 2 MB "device" per rank.
INFINITY_RUN = {
    "world_size": 4,
    "train_micro_batch_size_per_gpu": 4,          # x 4 ranks: the same global batch of 16 as the single-rank run
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                          "offload_param": {"device": "nvme", "nvme_path": "swap"},
                          "offload_optimizer": {"device": "nvme", "nvme_path": "swap"}},
    "memory": {"device_bytes": "2MB"},
    "run": {"steps": 200},
}
TASK_DATASET = {"lm": ("stdlib_bytes", "p5_synthetic"), "classify": ("listops", "stdlib_packages")}


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------

def _join(path, key):
    return f"{path}.{key}" if path else str(key)


def _unknown_key(path, key, allowed):
    known = [k.rpartition(".")[2] for k in deepspeed_keys.KNOWN if k.rpartition(".")[0] == path]
    close = difflib.get_close_matches(str(key), list(allowed) + known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(_join(path, key), f"unknown key{hint}; allowed in {path or 'the top level'}: "
                                        f"{', '.join(sorted(allowed))}")


def _validate_section(schema, value, path):
    if not isinstance(value, dict):
        raise ConfigError(path, f"must be a table (keys: {', '.join(schema)}), got {_show(value)}")
    for key in value:
        if key in schema:
            continue
        if deepspeed_keys.lookup(_join(path, key)) is None:
            _unknown_key(path, key, schema)
        deepspeed_keys.check_known(_join(path, key), value[key], ConfigError)  # warns, or refuses a strict one
    out = {}
    for key, spec in schema.items():
        sub = _join(path, key)
        if isinstance(spec, dict):
            out[key] = _validate_section(spec, value.get(key, {}), sub)
        elif key in value:
            out[key] = spec.check(sub, value[key])
        elif spec.default is REQUIRED:
            raise ConfigError(sub, "is required (DeepSpeed has no default for it)")
        else:
            out[key] = spec.check(sub, copy.deepcopy(spec.default))
    return out


def _normalise_aliases(layer):
    """DeepSpeed's other spellings of honoured keys, written as refimpl's (deepspeed_keys.normalise_spellings)."""
    return deepspeed_keys.normalise_spellings(layer, ConfigError)


def _require_supported(path, value, supported, what):
    if value not in supported:   # the schema has already checked the type
        raise ConfigError(path, f"{what} must be {' or '.join(map(repr, supported))} in this version, "
                                f"got {value!r}; allowed: {', '.join(map(repr, supported))}")


def _check_version_limits(cfg):
    """DeepSpeed features this version does not implement yet (widen the SUPPORTED_* constants)."""
    zero = cfg["zero_optimization"]
    _require_supported("zero_optimization.stage", zero["stage"], SUPPORTED_ZERO_STAGES, "ZeRO stage")
    for name in ("offload_param", "offload_optimizer"):
        if zero[name] is None:
            continue
        path = f"zero_optimization.{name}"
        _require_supported(f"{path}.device", zero[name]["device"], SUPPORTED_OFFLOAD_DEVICES[name], "offload device")
        if zero[name]["device"] == "nvme" and zero[name]["nvme_path"] is None:
            raise ConfigError(f"{path}.nvme_path", "is required when device is 'nvme'")
        if zero[name]["device"] != "none" and zero["stage"] < OFFLOAD_MIN_STAGE[name]:
            raise ConfigError(f"{path}.device", f"{zero[name]['device']!r} needs zero_optimization.stage >= "
                                                f"{OFFLOAD_MIN_STAGE[name]}, got stage {zero['stage']}")
    opt = zero["offload_optimizer"]
    if opt is not None and opt["device"] != "none" and opt["ratio"] < 1 and zero["stage"] < 3:
        import warnings                    # DeepSpeed reads the ratio in stage 3 only, and ignores it below
        warnings.warn(f"zero_optimization.offload_optimizer.ratio: DeepSpeed key with no effect in refimpl: "
                      f"{opt['ratio']} is honoured in stage 3 only (as in DeepSpeed), got stage {zero['stage']}",
                      deepspeed_keys.DeepSpeedKeyWarning, stacklevel=2)


def _resolve(cfg):
    """Rules across keys, and the derived values that ``null`` / ``"auto"`` stand for."""
    if cfg["model"]["tie_embeddings"] and cfg["zero_optimization"]["stage"] == 3:
        raise ConfigError("model.tie_embeddings", "is not supported with zero_optimization.stage 3 in this version "
                                                  "(the tied head would use the embedding outside its module)")
    if cfg["fp16"]["enabled"] and cfg["bf16"]["enabled"]:
        raise ConfigError("fp16.enabled", "only one of fp16/bf16 may be enabled, and bf16.enabled is true too")
    if cfg["model"]["dtype"] == "float64" and (cfg["fp16"]["enabled"] or cfg["bf16"]["enabled"]):
        raise ConfigError("model.dtype", f"float64 is the full-precision reference; it needs fp16.enabled and "
                                         f"bf16.enabled false, got fp16={cfg['fp16']['enabled']}, "
                                         f"bf16={cfg['bf16']['enabled']}")
    _resolve_batch_sizes(cfg)

    model, data, run = cfg["model"], cfg["data"], cfg["run"]
    if model["d_head"] is None:
        if model["d_model"] % model["n_heads"]:
            raise ConfigError("model.n_heads", f"must divide model.d_model ({model['d_model']}) when model.d_head "
                              f"is null, got {model['n_heads']}; set model.d_head to choose the head width freely")
        model["d_head"] = model["d_model"] // model["n_heads"]
    if model["d_ff"] is None:
        model["d_ff"] = 4 * model["d_model"]
    if data["dataset"] not in TASK_DATASET[model["task"]]:
        raise ConfigError("model.task", f"task {model['task']!r} needs data.dataset "
                          f"{' or '.join(map(repr, TASK_DATASET[model['task']]))}, got data.dataset {data['dataset']!r}")
    if data["seq_len"] > model["max_seq_len"]:
        raise ConfigError("data.seq_len", f"must be <= model.max_seq_len ({model['max_seq_len']}), "
                                          f"got {data['seq_len']}")
    if data["min_length"] > data["max_length"]:
        raise ConfigError("data.max_length", f"must be >= data.min_length ({data['min_length']}), "
                                             f"got {data['max_length']}")
    if data["seed"] is None:
        data["seed"] = run["seed"]
    if cfg["backend"] is None:   # precedence: --backend / --set / the config file > REFIMPL_BACKEND > numpy
        cfg["backend"] = os.environ.get("REFIMPL_BACKEND") or "numpy"

    opt = cfg["optimizer"]
    if opt["params"]["weight_decay"] is None:   # the default of the Adam DeepSpeed would build
        from .optim import adam_w_mode
        opt["params"]["weight_decay"] = 0.01 if opt["params"]["torch_adam"] and adam_w_mode(opt) else 0.0

    if cfg["scheduler"] is not None:
        params = cfg["scheduler"]["params"]
        if params.get("total_num_steps") == "auto":
            params["total_num_steps"] = max(run["steps"], 1)
        if "warmup_max_lr" in params and params["warmup_max_lr"] is None:
            params["warmup_max_lr"] = cfg["optimizer"]["params"]["lr"]
        from .lr_schedules import make_scheduler  # the schedule's own cross-key rules, reported as config errors
        try:
            make_scheduler(cfg["scheduler"], cfg["optimizer"]["params"]["lr"])
        except ValueError as exc:
            raise ConfigError("scheduler", str(exc)) from None


def _resolve_batch_sizes(cfg):
    """DeepSpeed's rule (DeepSpeedConfig._set_batch_related_parameters): any two of train_batch_size,
    train_micro_batch_size_per_gpu and gradient_accumulation_steps give the third; train_batch_size alone means
    gradient_accumulation_steps 1; the micro batch alone means accumulation 1. Then the three must agree.
    DeepSpeed refuses a config with neither batch size; refimpl takes a micro batch of 16 (its default run's)."""
    tbs, micro, gas, ws = (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"],
                           cfg["gradient_accumulation_steps"], cfg["world_size"])
    if tbs is None and micro is None:
        micro = 16
    if tbs is not None and micro is not None and gas is None:
        gas = tbs // micro // ws
    elif tbs is not None and micro is None:
        gas = gas or 1
        micro = tbs // ws // gas
    gas = gas or 1
    tbs = micro * gas * ws if tbs is None else tbs
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", gas)):
        if value < 1:
            raise ConfigError(key, f"is {value} when derived from train_batch_size={tbs} and world_size={ws}; "
                                   f"train_batch_size must be at least world_size * the other batch factor")
    if tbs != micro * gas * ws:
        raise ConfigError("train_batch_size", f"must equal train_micro_batch_size_per_gpu * "
                          f"gradient_accumulation_steps * world_size = {micro} * {gas} * {ws} = {micro * gas * ws}, "
                          f"got {tbs}")
    cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"] = \
        tbs, micro, gas


def validate(cfg: dict) -> dict:
    """Check ``cfg`` against the schema; return a new, fully resolved dict (``cfg`` is not changed)."""
    out = _validate_section(SCHEMA, _normalise_aliases(copy.deepcopy(cfg)), "")
    _check_version_limits(out)
    _resolve(out)
    return out


# ---------------------------------------------------------------------------------------------------------
# Layers: default, file, overrides
# ---------------------------------------------------------------------------------------------------------

def _deep_merge(base, overlay, path=""):
    """``overlay`` on top of ``base``, key by key, as new objects. A scheduler whose ``type`` changes starts
    afresh: another scheduler type has other params, and the old ones would be unknown keys. (The optimizer
    types share their params, so switching AdamW <-> Adam keeps lr and the rest.)"""
    if not (isinstance(base, dict) and isinstance(overlay, dict)):
        return copy.deepcopy(overlay)
    if path == "scheduler" and "type" in overlay and overlay["type"] != base.get("type"):
        return copy.deepcopy(overlay)
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        out[key] = _deep_merge(base.get(key), value, _join(path, key))
    return out


MAX_CONFIG_BYTES = 16 << 20


def _read_file(path) -> dict:
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".json", ".toml"):
        raise ConfigError(path, f"unsupported config file type {suffix or '(none)'!r}; allowed: .json, .toml")
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):   # a FIFO would block, /dev/zero never end, a directory not read
            raise ConfigError(path, "cannot read config file: not a regular file (a directory, FIFO or device); "
                                    "give a .json or .toml file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(path, f"config file is {st.st_size} bytes; at most {MAX_CONFIG_BYTES} are read")
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(path, f"cannot read config file: {e.strerror or e}") from None
    try:
        data = json.loads(raw) if suffix == ".json" else tomllib.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(path, f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except tomllib.TOMLDecodeError as e:   # its message ends "(at line L, column C)"
        raise ConfigError(path, f"malformed TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, f"is not UTF-8 text: {e}") from None
    except RecursionError:
        raise ConfigError(path, "is nested too deeply to be a config") from None
    except ValueError as e:                # e.g. an integer of more digits than Python converts (4300)
        raise ConfigError(path, f"holds a value that cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(path, f"must hold a JSON object / TOML table at the top, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], object]:
    """``"a.b.c=VALUE"`` -> (["a", "b", "c"], value). VALUE is JSON if it parses (3, 1e-3, true, "x",
    [0.9, 0.95], null), else the plain string (so ``run.out=runs/x`` needs no quotes)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise ConfigError(key, f"override {text!r} has no '='; expected KEY.PATH=VALUE, "
                               f"e.g. optimizer.params.lr=3e-4")
    keys = key.split(".")
    if not all(keys):
        raise ConfigError(key, f"override {text!r} has an empty key in its path")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw.strip()
    except RecursionError:
        raise ConfigError(key, f"override {key}=... is nested too deeply") from None
    except ValueError as e:                # an integer of more digits than Python converts
        raise ConfigError(key, f"override {key}=... holds a value that cannot be read: {e}") from None
    return keys, value


def merge_layers(path: str | None = None, overrides: list[str] = (), base: dict | None = None) -> dict:
    """The raw config before validation: ``base`` <- the file at ``path`` <- ``overrides``, DeepSpeed's other
    spellings normalised. ``base`` defaults to DEFAULT_CONFIG, or to FILE_BASE_CONFIG under a file."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'a.b.c=VALUE' strings, not one string")
    cfg = _normalise_aliases((DEFAULT_CONFIG if path is None else FILE_BASE_CONFIG) if base is None else base)
    if path is not None:
        cfg = _deep_merge(cfg, _normalise_aliases(_read_file(path)))
    for text in overrides:
        keys, value = parse_override(text)
        layer = value
        for key in reversed(keys):
            layer = {key: layer}
        cfg = _deep_merge(cfg, _normalise_aliases(layer))
    return cfg


def load_config(path: str | None = None, overrides: list[str] = (), base: dict | None = None) -> dict:
    """``merge_layers(path, overrides, base)``, validated and resolved. Neither ``base`` nor DEFAULT_CONFIG is
    changed. An error caused by a ``--set`` names it."""
    cfg = merge_layers(path, overrides, base)
    try:
        return validate(cfg)
    except ConfigError as e:
        for text in reversed(overrides):   # name the --set that caused it (the last one wins)
            p = ".".join(parse_override(text)[0])
            if p == e.key_path or p.startswith(e.key_path + ".") or e.key_path.startswith((p + ".", p + "[")):
                raise ConfigError(e.key_path, f"{e.detail} (from --set {text})") from None
        raise


def dumps(cfg) -> str:
    """Canonical JSON (sorted keys, indent 2, trailing newline), e.g. for a run's config.json."""
    return json.dumps(cfg, sort_keys=True, indent=2, allow_nan=False) + "\n"


def _schema_defaults(schema):
    return {k: _schema_defaults(s) if isinstance(s, dict) else copy.deepcopy(s.default) for k, s in schema.items()}


# The schema defaults with the default run on top. Derived keys stay null / "auto" here, so that a later
# layer changing d_model or run.steps still gets consistent d_ff and total_num_steps.
DEFAULT_CONFIG: dict = _deep_merge(_schema_defaults(SCHEMA), DEFAULT_RUN)
# Under a config file DeepSpeed's sections mean what they mean to DeepSpeed (its defaults; no scheduler unless the
# file has one); refimpl's own sections (model, data, run) start from the default run's.
OWN_SECTIONS = ("model", "data", "backend", "world_size", "memory", "run")
FILE_BASE_CONFIG: dict = _deep_merge(_schema_defaults(SCHEMA), {k: v for k, v in DEFAULT_RUN.items() if k in OWN_SECTIONS})
CLI_DEFAULT_CONFIG: dict = _deep_merge(DEFAULT_CONFIG, INFINITY_RUN)   # the base of `refimpl train` without --config
