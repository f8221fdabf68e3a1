"""Tests of refimpl.config: DeepSpeed-style configs load, defaults resolve, and every bad input is a
ConfigError whose message starts with the key path. Expected values come from the brief and from
DeepSpeed's documented defaults, never from the module under test."""
import copy
import json
import warnings

import pytest
from hypothesis import given, strategies as st

from refimpl import config
from refimpl.config import DEFAULT_CONFIG, ConfigError, dumps, load_config, parse_override, validate
from refimpl.deepspeed_keys import DeepSpeedKeyWarning

TOP_LEVEL = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
             "gradient_clipping", "optimizer", "scheduler", "fp16",
             "bf16", "zero_optimization", "activation_checkpointing", "aio", "backend", "world_size", "model",
             "data", "run", "memory"}
# DeepSpeed's FusedAdam defaults (deepspeed/ops/adam/fused_adam.py) and engine flags (runtime/config.py)
DEEPSPEED_ADAM = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "adam_w_mode": True,
                  "torch_adam": False, "bias_correction": True}


def get(cfg, dotted):
    for key in dotted.split("."):
        cfg = cfg[key]
    return cfg


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------------------------------------

def test_defaults_resolve():
    cfg = load_config()
    assert set(cfg) == TOP_LEVEL
    # the default run of the brief
    assert cfg["optimizer"] == {"type": "AdamW",
                                "params": {**DEEPSPEED_ADAM, "lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.01}}
    assert cfg["scheduler"] == {"type": "WarmupCosineLR",
                                "params": {"total_num_steps": 300, "warmup_min_ratio": 0.0, "warmup_num_steps": 30,
                                           "cos_min_ratio": 0.1, "warmup_type": "linear"}}
    assert cfg["model"]["task"] == "lm" and cfg["data"]["dataset"] == "stdlib_bytes"
    # derived values: d_model // n_heads, 4 * d_model, run.seed, micro * accumulation * world_size
    m = cfg["model"]
    assert m["d_head"] == m["d_model"] // m["n_heads"] and m["d_ff"] == 4 * m["d_model"]
    assert cfg["data"]["seed"] == cfg["run"]["seed"] == 1234
    assert cfg["train_batch_size"] == 16 * 1 * 1
    # DeepSpeed's fp16 defaults (deepspeed/runtime/constants.py)
    assert cfg["fp16"] == {"enabled": False, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                           "hysteresis": 2, "consecutive_hysteresis": False, "min_loss_scale": 1}
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 0 and zero["offload_param"] is None and zero["offload_optimizer"] is None
    for key, expected in [("reduce_bucket_size", 500_000_000),
                          ("sub_group_size", 10**9), ("stage3_prefetch_bucket_size", 50_000_000),
                          ("stage3_param_persistence_threshold", 100_000), ("stage3_max_live_parameters", 10**9),
                          ("stage3_max_reuse_distance", 10**9)]:
        assert zero[key] == expected and type(zero[key]) is int, key
    # DeepSpeed's aio defaults, and refimpl's own choice of NVMe store: the fast one
    assert cfg["aio"] == {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1, "engine": "aio"}


def test_validate_empty_dict_gives_deepspeed_defaults():
    cfg = validate({})
    assert cfg["optimizer"] == {"type": "AdamW", "params": DEEPSPEED_ADAM}
    assert cfg["scheduler"] is None and cfg["gradient_clipping"] == 1.0
    assert set(cfg) == TOP_LEVEL


def test_a_config_file_means_what_it_means_to_deepspeed(tmp_path):
    # Under a file, DeepSpeed's sections take DeepSpeed's defaults, not the default run's: an optimizer
    # section with only lr gets betas (0.9, 0.999) and weight_decay 0; no scheduler section, no scheduler.
    # refimpl's own sections still start from the default run.
    cfg = load_config(write(tmp_path, "c.json", json.dumps({"optimizer": {"type": "Adam", "params": {"lr": 2e-4}},
                                                            "train_batch_size": 8})))
    assert cfg["optimizer"] == {"type": "Adam", "params": {**DEEPSPEED_ADAM, "lr": 2e-4}}
    assert cfg["scheduler"] is None and cfg["gradient_clipping"] == 1.0
    # train_batch_size alone: gradient_accumulation_steps 1 and the micro batch from it (DeepSpeed)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (8, 1)
    assert cfg["model"] == load_config()["model"] and cfg["run"]["steps"] == DEFAULT_CONFIG["run"]["steps"]


@pytest.mark.parametrize("given, world, expected", [
    # any two of (train_batch_size, micro, accumulation) give the third (DeepSpeed's _set_batch_related_parameters)
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4}, 2, (64, 4, 8)),
    ({"train_batch_size": 64, "gradient_accumulation_steps": 4}, 2, (64, 8, 4)),
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2, (24, 4, 3)),
    ({"train_batch_size": 12}, 3, (12, 4, 1)),
    ({"train_micro_batch_size_per_gpu": 5}, 2, (10, 5, 1)),
    ({}, 1, (16, 16, 1)),                       # DeepSpeed needs one of the two; refimpl's default micro batch
])
def test_batch_sizes_follow_deepspeed(given, world, expected):
    cfg = validate({**given, "world_size": world})
    got = (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"])
    assert got == expected


@pytest.mark.parametrize("opt, expected_decay", [
    # DeepSpeed: FusedAdam / DeepSpeedCPUAdam default weight_decay 0; torch.optim.AdamW's default 0.01 with
    # torch_adam (Adam's stays 0). The decay mode: "AdamW" always decoupled, "Adam" unless adam_w_mode is false.
    ({"type": "Adam"}, 0.0),
    ({"type": "AdamW", "params": {"torch_adam": True}}, 0.01),
    ({"type": "Adam", "params": {"torch_adam": True}}, 0.01),                          # adam_w_mode: AdamW
    ({"type": "Adam", "params": {"torch_adam": True, "adam_w_mode": False}}, 0.0),     # torch.optim.Adam
])
def test_weight_decay_default_is_that_of_the_optimizer_deepspeed_builds(opt, expected_decay):
    assert validate({"optimizer": opt})["optimizer"]["params"]["weight_decay"] == expected_decay


def test_deepspeed_keys_without_effect_warn_once_and_strict_ones_refuse(tmp_path):
    ds = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "set_grad_none": False}},
          "zero_optimization": {"stage": 3, "stage3_model_persistence_threshold": 1000, "overlap_comm": True,
                                "contiguous_gradients": True},        # DeepSpeed's default: accepted silently
          "wandb": {"enabled": True}, "steps_per_print": 10}
    with pytest.warns(DeepSpeedKeyWarning) as record:
        cfg = load_config(write(tmp_path, "ds.json", json.dumps(ds)))
    named = sorted(str(w.message).split(":")[0] for w in record)
    assert named == ["optimizer.params.set_grad_none", "steps_per_print", "wandb",
                     "zero_optimization.overlap_comm", "zero_optimization.stage3_model_persistence_threshold"]
    assert "stage3_model_persistence_threshold" not in cfg["zero_optimization"] and "wandb" not in cfg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(overrides=["zero_optimization.contiguous_gradients=true"])   # a default: no warning
    for text, key, allowed in [("optimizer.params.amsgrad=true", "optimizer.params.amsgrad", "False"),
                               ("zero_optimization.zero_quantized_weights=true",
                                "zero_optimization.zero_quantized_weights", "False"),
                               ('gradient_allreduce_op="sum"', "gradient_allreduce_op", "'mean'"),
                               ('torch_autocast={"enabled": true}', "torch_autocast.enabled", "False"),
                               ("optimizer.params.max_grad_norm=1.0", "optimizer.params.max_grad_norm",
                                "gradient_clipping")]:
        with pytest.raises(ConfigError, match=rf"^{key}: .*{allowed}") as e:
            load_config(overrides=[text])
        assert e.value.key_path == key
    with pytest.raises(ConfigError, match="did you mean 'gradient_clipping'"):   # DeepSpeed would ignore it
        load_config(overrides=["gradient_clippping=1.0"])


def test_deepspeed_spellings_of_honoured_keys():
    cfg = validate({"zero_optimization": {"stage": 3, "prefetch_bucket_size": 123, "param_persistence_threshold": 7},
                    "bfloat16": {"enabled": True}})
    z = cfg["zero_optimization"]
    assert (z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) == (123, 7)
    assert cfg["bf16"]["enabled"] is True
    cfg = validate({"zero_optimization": {"stage": 1, "cpu_offload": True}})     # DeepSpeed's deprecated form
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(ConfigError, match="zero_optimization.prefetch_bucket_size: is another name"):
        validate({"zero_optimization": {"prefetch_bucket_size": 1, "stage3_prefetch_bucket_size": 2}})


def test_resolved_config_is_a_fixed_point_and_round_trips_through_dumps():
    cfg = load_config(overrides=["model.d_model=96", "model.n_heads=3"])
    assert validate(cfg) == cfg
    text = dumps(cfg)
    assert text == json.dumps(cfg, sort_keys=True, indent=2) + "\n"
    assert validate(json.loads(text)) == cfg


def test_load_config_does_not_mutate_default_or_base(tmp_path):
    before = copy.deepcopy(DEFAULT_CONFIG)
    path = write(tmp_path, "c.json", json.dumps({"aio": {"thread_count": 3}, "model": {"d_model": 64},
                                                 "scheduler": {"type": "WarmupLR"}}))
    load_config(path, ["optimizer.params.lr=0.1", "run.steps=7", "zero_optimization.offload_param.device=none"])
    assert DEFAULT_CONFIG == before
    base = {"run": {"steps": 5}, "aio": {"thread_count": 2}}
    base_before = copy.deepcopy(base)
    cfg = load_config(None, ["run.steps=9"], base=base)
    assert base == base_before and cfg["run"]["steps"] == 9 and cfg["aio"]["intra_op_parallelism"] == 2
    validate(base)
    assert base == base_before


def test_derived_values_follow_later_layers():
    cfg = load_config(overrides=["model.d_model=64", "model.n_heads=4", "run.steps=40", "run.seed=7"])
    assert cfg["model"]["d_ff"] == 256 and cfg["model"]["d_head"] == 16
    assert cfg["scheduler"]["params"]["total_num_steps"] == 40 and cfg["data"]["seed"] == 7


def test_d_head_decouples_width_from_d_model():
    cfg = load_config(overrides=["model.d_model=130", "model.n_heads=4", "model.d_head=32"])
    assert cfg["model"]["d_head"] == 32 and cfg["model"]["n_heads"] == 4


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------

DEEPSPEED_CONFIG = {
    "train_batch_size": 32,
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 4,
    "gradient_clipping": 1.0,
    "steps_per_print": 100,
    "wall_clock_breakdown": False,
    "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_num_steps": 100}},
    "fp16": {"enabled": True, "loss_scale": 0, "loss_scale_window": 500, "initial_scale_power": 12,
             "hysteresis": 2, "min_loss_scale": 1},
    "zero_optimization": {"stage": 0, "contiguous_gradients": True, "overlap_comm": True,
                          "reduce_bucket_size": 5e8, "allgather_bucket_size": 2e8,
                          "stage3_prefetch_bucket_size": 5e7,
                          "offload_optimizer": {"device": "none", "pin_memory": True}},
}


def test_deepspeed_json_config_loads(tmp_path):
    with pytest.warns(DeepSpeedKeyWarning):   # steps_per_print, overlap_comm, allgather_bucket_size, pin_memory
        cfg = load_config(write(tmp_path, "ds_config.json", json.dumps(DEEPSPEED_CONFIG, indent=2)))
    assert cfg["train_batch_size"] == 32 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["optimizer"] == {"type": "Adam", "params": {**DEEPSPEED_ADAM, "lr": 1e-4, "betas": [0.8, 0.999],
                                                           "weight_decay": 3e-7}}
    # WarmupLR replaces the default WarmupCosineLR wholesale: no cosine params leak in; DeepSpeed's
    # defaults fill the rest and warmup_max_lr falls back to the optimizer's lr.
    assert cfg["scheduler"] == {"type": "WarmupLR",
                                "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-4, "warmup_num_steps": 100,
                                           "warmup_type": "log"}}
    assert cfg["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 500,
                           "hysteresis": 2, "consecutive_hysteresis": False, "min_loss_scale": 1}
    zero = cfg["zero_optimization"]
    assert "overlap_comm" not in zero and "allgather_bucket_size" not in zero    # accepted, with no effect
    assert zero["reduce_bucket_size"] == 500_000_000
    assert type(zero["reduce_bucket_size"]) is int and type(zero["stage3_prefetch_bucket_size"]) is int
    assert zero["offload_optimizer"] == {"device": "none", "nvme_path": None, "buffer_count": 4, "ratio": 1.0}


def test_offload_param_section_fills_deepspeed_defaults():
    cfg = load_config(overrides=['zero_optimization.offload_param={"device": "none"}'])
    assert cfg["zero_optimization"]["offload_param"] == {
        "device": "none", "nvme_path": None, "buffer_count": 5, "buffer_size": 100_000_000}


def test_toml_config_loads(tmp_path):
    path = write(tmp_path, "run.toml", """
train_micro_batch_size_per_gpu = 4
backend = "numba"

[optimizer]
type = "adamw"
[optimizer.params]
lr = 5e-4
betas = [0.9, 0.98]

[zero_optimization]
reduce_bucket_size = 2e8

[model]
task = "classify"
n_layers = 3
d_model = 64
n_heads = 8

[data]
dataset = "listops"
seq_len = 64

[run]
steps = 50
out = "runs/toml"
""")
    cfg = load_config(path)
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["optimizer"]["params"]["lr"] == 5e-4
    assert cfg["optimizer"]["params"]["betas"] == [0.9, 0.98]
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 200_000_000
    assert cfg["model"]["task"] == "classify" and cfg["data"]["dataset"] == "listops"
    assert cfg["model"]["d_head"] == 64 // 8 and cfg["model"]["n_layers"] == 3
    assert cfg["train_batch_size"] == 4 and cfg["backend"] == "numba" and cfg["run"]["out"] == "runs/toml"
    assert cfg["scheduler"] is None     # a file without a scheduler section has none, as in DeepSpeed


# ---------------------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, key, expected", [
    ("run.steps=7", "run.steps", 7),                                       # JSON int
    ("optimizer.params.lr=1e-4", "optimizer.params.lr", 1e-4),             # JSON float
    ("fp16.enabled=true", "fp16.enabled", True),                           # JSON bool
    ('backend="numba"', "backend", "numba"),                               # JSON string
    ("optimizer.params.betas=[0.8, 0.99]", "optimizer.params.betas", [0.8, 0.99]),   # JSON list
    ("run.checkpoint_interval=null", "run.checkpoint_interval", None),     # JSON null
    ("scheduler=null", "scheduler", None),
    ("run.out=runs/exp 1", "run.out", "runs/exp 1"),                       # not JSON: a plain string
    ("backend=numba", "backend", "numba"),
    ("optimizer.type=ADAM", "optimizer.type", "Adam"),                     # case-insensitive, normalised
])
def test_override_value_types(text, key, expected):
    cfg = load_config(overrides=[text])
    assert get(cfg, key) == expected and type(get(cfg, key)) is type(expected)


def test_override_optimizer_type_keeps_params():
    cfg = load_config(overrides=["optimizer.type=Adam"])
    assert cfg["optimizer"]["params"]["lr"] == 3e-3 and cfg["optimizer"]["params"]["betas"] == [0.9, 0.95]


def test_later_override_wins():
    assert load_config(overrides=["run.steps=5", "run.steps=6"])["run"]["steps"] == 6


@pytest.mark.parametrize("text, keys, value", [
    ("a.b.c=[1, 2]", ["a", "b", "c"], [1, 2]),
    ("a = 3", ["a"], 3),
    ("x.y=1=2", ["x", "y"], "1=2"),
    ('x={"k": null}', ["x"], {"k": None}),
    ("x=", ["x"], ""),
])
def test_parse_override(text, keys, value):
    assert parse_override(text) == (keys, value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)


@given(keys=st.lists(st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True), min_size=1, max_size=4),
       value=json_values)
def test_parse_override_reads_any_json_value(keys, value):
    assert parse_override(".".join(keys) + "=" + json.dumps(value)) == (keys, value)


# ---------------------------------------------------------------------------------------------------------
# Aliases and "auto"
# ---------------------------------------------------------------------------------------------------------

def test_thread_count_alias(tmp_path):
    cfg = load_config(write(tmp_path, "a.json", '{"aio": {"thread_count": 4, "queue_depth": 16}}'))
    assert cfg["aio"]["intra_op_parallelism"] == 4 and "thread_count" not in cfg["aio"]
    assert cfg["aio"]["queue_depth"] == 16
    assert load_config(overrides=["aio.thread_count=3"])["aio"]["intra_op_parallelism"] == 3
    same = validate({"aio": {"thread_count": 2, "intra_op_parallelism": 2}})
    assert same["aio"]["intra_op_parallelism"] == 2 and "thread_count" not in same["aio"]
    with pytest.raises(ConfigError, match=r"^aio\.thread_count: ") as err:
        validate({"aio": {"thread_count": 2, "intra_op_parallelism": 3}})
    assert "intra_op_parallelism" in str(err.value)


@pytest.mark.parametrize("scheduler, steps", [
    ({"type": "WarmupCosineLR", "params": {"total_num_steps": "auto"}}, 123),
    ({"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}}, 77),
])
def test_auto_total_num_steps_is_run_steps(tmp_path, scheduler, steps):
    path = write(tmp_path, "s.json", json.dumps({"scheduler": scheduler, "run": {"steps": steps}}))
    params = load_config(path)["scheduler"]["params"]
    assert params["total_num_steps"] == steps and type(params["total_num_steps"]) is int


def test_explicit_total_num_steps_is_kept_and_decay_uses_deepspeed_max_lr():
    cfg = load_config(overrides=['scheduler={"type": "WarmupDecayLR", "params": {"total_num_steps": 900}}'])
    # DeepSpeed's WarmupDecayLR defaults warmup_max_lr to 0.001 (lr_schedules.py), not the optimizer's lr
    assert cfg["scheduler"]["params"] == {"total_num_steps": 900, "warmup_min_lr": 0.0, "warmup_max_lr": 0.001,
                                          "warmup_num_steps": 1000, "warmup_type": "log"}


# ---------------------------------------------------------------------------------------------------------
# Errors: each names the key path first
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key_path, fragments", [
    # out of range
    (["optimizer.params.lr=-1"], "optimizer.params.lr", ["must be > 0, got -1"]),
    (["run.steps=-1"], "run.steps", [">= 0", "-1"]),
    (["gradient_clipping=-0.5"], "gradient_clipping", [">= 0"]),
    (["optimizer.params.betas=[0.9, 1.0]"], "optimizer.params.betas[1]", ["[0, 1)", "1.0", "from --set"]),
    (["optimizer.params.eps=0"], "optimizer.params.eps", ["> 0"]),
    (["data.val_fraction=0.9"], "data.val_fraction", ["0.9"]),
    (["fp16.min_loss_scale=0"], "fp16.min_loss_scale", ["> 0"]),
    (["optimizer.params.lr=NaN"], "optimizer.params.lr", ["finite"]),
    # wrong type; bool is not a number
    (["optimizer.params.lr=true"], "optimizer.params.lr", ["number", "True"]),
    (["train_micro_batch_size_per_gpu=true"], "train_micro_batch_size_per_gpu", ["int", "True"]),
    (['run.steps="10"'], "run.steps", ["int", "'10'"]),
    (["run.steps=2.5"], "run.steps", ["int"]),
    (["fp16.enabled=1"], "fp16.enabled", ["true or false"]),
    (["optimizer.params.betas=0.9"], "optimizer.params.betas", ["two numbers"]),
    (["zero_optimization.reduce_bucket_size=5.5"], "zero_optimization.reduce_bucket_size", ["int"]),
    (["backend="], "backend", ["non-empty"]),
    (["fp16=null"], "fp16", ["table"]),
    # not in the allowed set: the message lists the allowed values
    (["model.attention=flash"], "model.attention", ["'plain'", "'tiled'", "flash"]),
    (["optimizer.type=SGD"], "optimizer.type", ["'AdamW'", "'Adam'"]),
    (["scheduler.type=OneCycle"], "scheduler.type", ["'WarmupLR'", "'WarmupDecayLR'", "'WarmupCosineLR'"]),
    (["scheduler.params.warmup_type=cosine"], "scheduler.params.warmup_type", ["'log'", "'linear'"]),
    (["data.dataset=imagenet"], "data.dataset", ["'stdlib_bytes'", "'listops'"]),
    # limits of this version
    (["zero_optimization.stage=4"], "zero_optimization.stage", ["allowed: 0, 1, 2, 3"]),
    (["zero_optimization.stage=true"], "zero_optimization.stage", ["int"]),
    (["zero_optimization.offload_param.device=cpu"], "zero_optimization.offload_param.device", ["stage >= 3", "stage 0"]),
    (["zero_optimization.offload_optimizer.device=gpu"], "zero_optimization.offload_optimizer.device",
     ["'none'", "'cpu'", "'nvme'"]),
    (["world_size=0"], "world_size", ["[1, 1024]", "0"]),
    (["run.comm_timeout=0"], "run.comm_timeout", ["> 0"]),
    (["zero_optimization.stage=3", "model.tie_embeddings=true"], "model.tie_embeddings", ["stage 3"]),
    # rules across keys
    (["fp16.enabled=true", "bf16.enabled=true"], "fp16.enabled", ["only one of fp16/bf16"]),
    (["train_batch_size=100"], "train_batch_size", ["16 * 6 * 1 = 96", "100"]),
    (["train_micro_batch_size_per_gpu=4", "gradient_accumulation_steps=3", "train_batch_size=16"],
     "train_batch_size", ["4 * 3 * 1 = 12"]),
    (["model.d_model=130"], "model.n_heads", ["130", "model.d_head"]),
    (["data.seq_len=256"], "data.seq_len", ["model.max_seq_len", "128", "256"]),
    (["model.task=classify"], "model.task", ["'classify'", "data.dataset", "'listops'", "'stdlib_bytes'"]),
    (["data.min_length=10", "data.max_length=9"], "data.max_length", ["data.min_length"]),
    (['scheduler={"type": "WarmupDecayLR"}'], "scheduler.params.total_num_steps", ["required"]),
    (["scheduler.params.total_num_steps=soon"], "scheduler.params.total_num_steps", ["int", '"auto"', "'soon'"]),
    # unknown keys, anywhere; the message lists what is allowed at that level and comes from --set
    (["optimizer.params.lrr=0.1"], "optimizer.params.lrr", ["did you mean 'lr'", "betas, bias_correction, eps, lr, torch_adam, weight_decay",
                                                            "--set optimizer.params.lrr=0.1"]),
    (["runn.steps=3"], "runn", ["did you mean 'run'", "--set runn.steps=3"]),
    (["run.steps.every=3"], "run.steps", ["int", "--set run.steps.every=3"]),
    (["aio.thread_count=0"], "aio.intra_op_parallelism", [">= 1"]),
    (["scheduler.type=WarmupLR", "scheduler.params.cos_min_ratio=0.2"], "scheduler.params.cos_min_ratio",
     ["unknown key", "warmup_max_lr"]),
    (["zero_optimization.offload_param.pin_memmory=true"], "zero_optimization.offload_param.pin_memmory",
     ["did you mean 'pin_memory'"]),
])
def test_errors_name_the_key_path(overrides, key_path, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    message = str(err.value)
    assert isinstance(err.value, ValueError) and err.value.key_path == key_path
    assert message.startswith(key_path + ": "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("text, key_path, fragments", [
    ("run.steps", "run.steps", ["no '='", "KEY.PATH=VALUE"]),
    ("run..steps=3", "run..steps", ["empty key"]),
])
def test_bad_override_syntax(text, key_path, fragments):
    for call in (lambda: parse_override(text), lambda: load_config(overrides=[text])):
        with pytest.raises(ConfigError) as err:
            call()
        assert err.value.key_path == key_path and str(err.value).startswith(key_path + ": ")
        assert all(f in str(err.value) for f in fragments)


def test_overrides_must_be_a_list():
    with pytest.raises(TypeError):
        load_config(overrides="run.steps=3")


@pytest.mark.parametrize("name, text, fragments", [
    ("trailing_comma.json", '{\n  "run": {\n    "steps": 3,\n  }\n}\n', ["malformed JSON", "line 4", "column 3"]),
    ("bad.toml", "[run]\nsteps = = 3\n", ["malformed TOML", "line 2"]),
    ("list.json", "[1, 2]", ["top", "list"]),
    ("conf.yaml", "run: {steps: 3}", ["'.yaml'", ".json, .toml"]),
    ("latin1.json", b'{"backend": "\xe9"}', ["UTF-8"]),
])
def test_malformed_files_name_the_path(tmp_path, name, text, fragments):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert err.value.key_path == str(path) and str(err.value).startswith(str(path) + ": ")
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="cannot read") as err:
        load_config(path)
    assert err.value.key_path == path and str(err.value).startswith(path)
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(ConfigError, match="cannot read"):   # a directory is unreadable as a file
        load_config(str(tmp_path / "dir.json"))


@pytest.mark.parametrize("cfg, key_path, fragments", [
    ({"zero_optimization": {"stag": 0}}, "zero_optimization.stag", ["did you mean 'stage'", "stage3_prefetch_bucket_size"]),
    ({"model": {"n_layer": 2}}, "model.n_layer", ["did you mean 'n_layers'"]),
    ({"optimiser": {}}, "optimiser", ["did you mean 'optimizer'", "the top level"]),
    ({"scheduler": {"type": "WarmupLR", "param": {}}}, "scheduler.param", ["'params'"]),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {}}}, "scheduler.params.total_num_steps", ["required"]),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16.enabled", ["only one of fp16/bf16"]),
])
def test_validate_errors(cfg, key_path, fragments):
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key_path == key_path and str(err.value).startswith(key_path + ": ")
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_file_typo_is_reported_with_full_path(tmp_path):
    path = write(tmp_path, "typo.json", json.dumps({"zero_optimization": {"offload_optimizer": {"devic": "cpu"}}}))
    with pytest.raises(ConfigError, match=r"^zero_optimization\.offload_optimizer\.devic: unknown key"):
        load_config(path)


# ---------------------------------------------------------------------------------------------------------
# The version limits are module constants that widen without other changes
# ---------------------------------------------------------------------------------------------------------

def test_widening_supported_sets(monkeypatch):
    monkeypatch.setattr(config, "SUPPORTED_ZERO_STAGES", (0, 1, 2, 3))
    monkeypatch.setattr(config, "SUPPORTED_OFFLOAD_DEVICES", {"offload_param": ("none", "cpu", "nvme"),
                                                              "offload_optimizer": ("none", "cpu", "nvme")})
    cfg = load_config(overrides=["zero_optimization.stage=3", "zero_optimization.offload_param.device=cpu"])
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    with pytest.raises(ConfigError, match=r"^zero_optimization\.offload_optimizer\.nvme_path: .*nvme"):
        load_config(overrides=["zero_optimization.stage=1", "zero_optimization.offload_optimizer.device=nvme"])
    cfg = load_config(overrides=["zero_optimization.stage=1",
                                 'zero_optimization.offload_optimizer={"device": "nvme", "nvme_path": "/tmp/x"}'])
    assert cfg["zero_optimization"]["offload_optimizer"]["nvme_path"] == "/tmp/x"
