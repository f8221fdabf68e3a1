"""refimpl's semantics against the installed DeepSpeed's own code (extra [crosscheck]; skipped without it).

Where refimpl re-implements a rule of DeepSpeed's (LR schedules, the fp16 DynamicLossScaler, how the engine picks
Adam's decay mode and default weight decay, which config keys exist and their defaults), the rule is run here on
DeepSpeed's real classes, step for step, and refimpl must agree exactly.
"""
import inspect
import math

import pytest
from hypothesis import given, settings, strategies as st

torch = pytest.importorskip("torch")
deepspeed = pytest.importorskip("deepspeed")

from refimpl import config as refimpl_config  # noqa: E402
from refimpl import deepspeed_keys  # noqa: E402
from refimpl.config import validate  # noqa: E402
from refimpl.loss_scaler import DynamicLossScaler, MinLossScaleError  # noqa: E402
from refimpl.lr_schedules import lr_at, make_scheduler  # noqa: E402
from refimpl.optim import adam_w_mode  # noqa: E402

pytestmark = pytest.mark.crosscheck


# ---------------------------------------------------------------------------------------------- schedules
SCHEDULES = [
    ("WarmupLR", {"warmup_min_lr": 1e-5, "warmup_num_steps": 7}),
    ("WarmupLR", {"warmup_max_lr": 2e-3, "warmup_num_steps": 1, "warmup_type": "linear"}),
    ("WarmupDecayLR", {"total_num_steps": 30, "warmup_max_lr": 5e-3, "warmup_num_steps": 8}),
    ("WarmupDecayLR", {"total_num_steps": 5, "warmup_num_steps": 9, "warmup_type": "linear"}),
    ("WarmupCosineLR", {"total_num_steps": 30, "warmup_num_steps": 5}),
    ("WarmupCosineLR", {"total_num_steps": 40, "warmup_num_steps": 12, "warmup_min_ratio": 0.1,
                        "cos_min_ratio": 0.05, "warmup_type": "linear"}),
    ("WarmupCosineLR", {"total_num_steps": 8, "warmup_num_steps": 12, "cos_min_ratio": 0.05}),   # warmup > total
]


@pytest.mark.parametrize("kind,params", SCHEDULES)
def test_lr_at_equals_deepspeeds_scheduler_past_the_end(kind, params):
    from deepspeed.runtime import lr_schedules as ds
    base_lr = 3e-3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=base_lr)
    sched = getattr(ds, kind)(opt, **params)      # DeepSpeed's engine: constructed once, step() after each step
    used = []
    for _ in range(3 * params.get("total_num_steps", 20)):
        used.append(opt.param_groups[0]["lr"])
        sched.step()
    ours = [lr_at(k, {"type": kind, "params": params}, base_lr) for k in range(len(used))]
    assert ours == used                           # the same formula, to the last bit
    s = make_scheduler({"type": kind, "params": params}, base_lr)   # and the stateful schedule object alike
    stepped = []
    for _ in used:
        stepped.append(s.get_lr())
        s.step()
    assert stepped == used


# ------------------------------------------------------------------------------------------- loss scaler
@pytest.fixture(scope="module")
def ds_scaler_class():
    from deepspeed.runtime.fp16 import loss_scaler
    mp = pytest.MonkeyPatch()
    mp.setattr(loss_scaler.dist, "get_rank", lambda *a, **k: 0)   # it logs from rank 0 only
    yield loss_scaler.DynamicLossScaler
    mp.undo()


@settings(max_examples=40)
@given(window=st.integers(1, 6), hysteresis=st.integers(1, 3), consecutive=st.booleans(),
       power=st.integers(4, 24), min_scale=st.sampled_from([1, 2, 64]),
       pattern=st.lists(st.booleans(), min_size=1, max_size=60))
def test_dynamic_loss_scaler_equals_deepspeeds(ds_scaler_class, window, hysteresis, consecutive, power, min_scale,
                                               pattern):
    cfg = {"initial_scale_power": power, "loss_scale_window": window, "hysteresis": hysteresis,
           "consecutive_hysteresis": consecutive, "min_loss_scale": min_scale}
    ours = DynamicLossScaler.from_config(cfg)
    theirs = ds_scaler_class(init_scale=2 ** power, scale_window=window, min_scale=min_scale,
                             delayed_shift=hysteresis, consecutive_hysteresis=consecutive)
    for overflow in pattern:
        try:
            theirs.update_scale(overflow)
        except Exception as exc:                   # DeepSpeed raises a bare Exception at the floor
            assert "minimum" in str(exc)
            with pytest.raises(MinLossScaleError):
                ours.update_scale(overflow)
            return
        ours.update_scale(overflow)
        assert (ours.cur_scale, ours.cur_hysteresis, ours.cur_iter, ours.last_overflow_iter) == \
            (theirs.cur_scale, theirs.cur_hysteresis, theirs.cur_iter, theirs.last_overflow_iter)


# ------------------------------------------------------------------------------------ Adam: mode, defaults
class _Recorder:
    def __init__(self, params, **kwargs):
        self.kwargs = kwargs


def _deepspeed_optimizer(monkeypatch, name, params, offload):
    """What DeepSpeed's engine builds for an optimizer section: (class name, effective AdamW?, weight decay)."""
    from deepspeed.ops import adam
    from deepspeed.runtime.engine import DeepSpeedEngine
    real = {"FusedAdam": adam.FusedAdam, "DeepSpeedCPUAdam": adam.DeepSpeedCPUAdam}
    made = {}
    for cls_name in real:
        rec = type(cls_name, (_Recorder,), {})
        monkeypatch.setattr(adam, cls_name, rec)
        made[cls_name] = rec

    class Engine:   # the few engine methods _configure_basic_optimizer consults
        get_optimizer_configuration = DeepSpeedEngine.get_optimizer_configuration
        zenflow = False

        def optimizer_name(self):
            return name.lower()

        def optimizer_params(self):
            return dict(params)

        def zero_use_cpu_optimizer(self):
            return offload

        def bf16_optimizer_states(self):
            return False

    opt = DeepSpeedEngine._configure_basic_optimizer(Engine(), [torch.nn.Parameter(torch.zeros(3))])
    if isinstance(opt, _Recorder):
        cls = real[type(opt).__name__]
        mode = opt.kwargs["adam_w_mode" if type(opt).__name__ == "FusedAdam" else "adamw_mode"]
        wd = opt.kwargs.get("weight_decay", inspect.signature(cls).parameters["weight_decay"].default)
        return type(opt).__name__, bool(mode), float(wd)
    return type(opt).__name__, isinstance(opt, torch.optim.AdamW), float(opt.param_groups[0]["weight_decay"])


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("flags", [{}, {"adam_w_mode": True}, {"adam_w_mode": False}, {"torch_adam": True},
                                   {"torch_adam": True, "adam_w_mode": False}, {"weight_decay": 0.1},
                                   {"weight_decay": 0.1, "adam_w_mode": False}])
@pytest.mark.parametrize("offload", [False, True])
def test_adam_mode_and_default_weight_decay_equal_deepspeeds_choice(monkeypatch, name, flags, offload):
    kind, ds_adamw, ds_wd = _deepspeed_optimizer(monkeypatch, name, flags, offload)
    cfg = validate({"optimizer": {"type": name, "params": flags}})
    assert adam_w_mode(cfg["optimizer"]) is ds_adamw, kind
    assert cfg["optimizer"]["params"]["weight_decay"] == ds_wd, kind


# -------------------------------------------------------------------------------------------- config keys
def _ds_models():
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import (DeepSpeedZeroOffloadOptimizerConfig,
                                                       DeepSpeedZeroOffloadParamConfig)
    return {"zero_optimization": DeepSpeedZeroConfig, "zero_optimization.offload_param": DeepSpeedZeroOffloadParamConfig,
            "zero_optimization.offload_optimizer": DeepSpeedZeroOffloadOptimizerConfig, "fp16": DeepSpeedFP16Config,
            "bf16": DeepSpeedBF16Config}


def _schema_at(path):
    node = refimpl_config.SCHEMA
    for key in path.split("."):
        node = node[key]
        if isinstance(node, refimpl_config.Field):   # an optional section: the dict inside the checker
            node = {"offload_param": refimpl_config.OFFLOAD_PARAM,
                    "offload_optimizer": refimpl_config.OFFLOAD_OPTIMIZER}[key]
    return node


def _refimpl_knows(section, key):
    path = f"{section}.{key}"
    return (key in _schema_at(section) or path in deepspeed_keys.KNOWN or path in deepspeed_keys.RENAMED
            or path in deepspeed_keys.DEPRECATED_OFFLOAD)


@pytest.mark.parametrize("section", list(_ds_models()))
def test_every_deepspeed_key_is_honoured_or_known_and_defaults_agree(section):
    model = _ds_models()[section]
    ds_keys = {}
    for name, field in model.model_fields.items():
        ds_keys[name] = field
        if field.alias:
            ds_keys[field.alias] = field
    missing = sorted(k for k in ds_keys if not _refimpl_knows(section, k))
    assert not missing, f"DeepSpeed keys of {section} refimpl neither honours nor lists: {missing}"
    invented = sorted(p for p in deepspeed_keys.KNOWN if p.rpartition(".")[0] == section
                      and p.rpartition(".")[2] not in ds_keys)
    assert not invented, f"keys listed as DeepSpeed's that DeepSpeed {deepspeed.__version__} does not know: {invented}"
    # defaults: honoured keys and listed ones must carry DeepSpeed's default
    schema = _schema_at(section)
    for key, field in ds_keys.items():
        default = field.get_default(call_default_factory=True)
        if key in schema and isinstance(schema[key], refimpl_config.Field) and key not in (
                "offload_param", "offload_optimizer"):
            assert schema[key].default == default or (default is None and key == "nvme_path"), (section, key)
        known = deepspeed_keys.KNOWN.get(f"{section}.{key}")
        if known is not None and known.default is not deepspeed_keys.NO_DEFAULT and not isinstance(default,
                                                                                                     type(None)):
            if not hasattr(default, "model_fields"):
                assert known.default == default or (isinstance(default, int) and default > 2**40), (section, key)


def test_aio_and_activation_checkpointing_keys_are_deepspeeds():
    from deepspeed.runtime.activation_checkpointing.config import ACT_CHKPT_DEFAULT
    from deepspeed.runtime.swap_tensor.aio_config import AIO_DEFAULT_DICT
    for section, ds in (("aio", AIO_DEFAULT_DICT), ("activation_checkpointing", ACT_CHKPT_DEFAULT)):
        for key, default in ds.items():
            assert _refimpl_knows(section, key), (section, key)
            honoured = _schema_at(section).get(key)
            expected = honoured.default if honoured is not None else deepspeed_keys.KNOWN[f"{section}.{key}"].default
            assert expected == default, (section, key)


def test_a_deepspeed_config_validates_in_deepspeed_and_in_refimpl():
    """The resolved DeepSpeed sections refimpl hands its DeepSpeed peer are a config DeepSpeed accepts."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from refimpl.crosscheck.deepspeed_side import deepspeed_config
    raw = {"zero_optimization": {"stage": 3, "overlap_comm": True, "prefetch_bucket_size": 1000,
                                 "offload_optimizer": {"device": "cpu", "pin_memory": False}},
           "fp16": {"enabled": True, "auto_cast": False}, "optimizer": {"type": "Adam", "params": {"lr": 1e-4}}}
    with pytest.warns(deepspeed_keys.DeepSpeedKeyWarning):
        cfg = validate(raw)
    ds = deepspeed_config(cfg, deepspeed_keys.normalise_spellings(raw, ValueError), "/tmp/unused")
    zero = DeepSpeedZeroConfig(**ds["zero_optimization"])
    assert zero.overlap_comm is True and zero.prefetch_bucket_size == 1000 and zero.offload_optimizer.pin_memory is False
    assert math.isclose(ds["optimizer"]["params"]["lr"], 1e-4) and ds["optimizer"]["params"]["weight_decay"] == 0.0
