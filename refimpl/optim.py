"""AdamW on flat fp32 partitions, gradient clipping, loss scaling and LR schedules.

ZeRO-Infinity (Rajbhandari et al., SC'21, §5) keeps, on every rank, an fp32 master copy of its
shard of the parameters plus the two Adam moments, all as flat contiguous partitions; the
optimizer step runs on those partitions and writes back a low-precision copy of the weights.
`AdamW` is that per-partition optimizer; the arithmetic is the backend's fused ``adam_step``
kernel (the reference is ``refimpl/kernels/optim.py``).

The rest reproduces DeepSpeed's training-loop numerics, with DeepSpeed's names and config keys:

- `global_grad_norm` / `clip_coefficient`: ``torch.nn.utils.clip_grad_norm_`` semantics, as
  DeepSpeed's ``gradient_clipping`` uses them (the factor is folded into Adam's ``grad_scale``
  together with the loss scale, as in ``deepspeed/runtime/zero/stage_1_and_2.py``
  ``unscale_and_clip_grads``).
- `DynamicLossScaler` / `StaticLossScaler`: ``deepspeed/runtime/fp16/loss_scaler.py``
  (``DynamicLossScaler.update_scale``, ``LossScaler``), defaults from the ``fp16`` section of
  ``deepspeed/runtime/constants.py``.
- `WarmupLR`, `WarmupDecayLR`, `WarmupCosineLR`, `lr_at`: ``deepspeed/runtime/lr_schedules.py``.
"""
import math
from numbers import Integral, Real

import numpy as np


# ---------------------------------------------------------------------------------------------
# AdamW on a flat fp32 partition
# ---------------------------------------------------------------------------------------------

class AdamW:
    """AdamW on flat fp32 master weights (ZeRO-Infinity §5 keeps fp32 master + moments as flat partitions).

    ``master`` is a flat float32 backend array (the fp32 master weights, possibly this rank's
    shard); it is updated in place. ``exp_avg`` / ``exp_avg_sq`` are allocated as zeros, as
    torch does lazily on the first step. ``backend`` supplies ``adam_step``, ``zeros``, ``xp``
    and ``to_numpy``.
    """

    def __init__(self, master, *, backend, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.01, adamw_mode=True):
        if master.ndim != 1 or master.dtype != np.float32:
            raise ValueError(f"AdamW: master must be a flat float32 array, got shape {master.shape} "
                             f"dtype {master.dtype}")
        beta1, beta2 = betas
        # Same admissible ranges as torch.optim.Adam's constructor checks.
        for name, value, ok, allowed in (
                ("lr", lr, lr >= 0, ">= 0"),
                ("betas[0]", beta1, 0 <= beta1 < 1, "in [0, 1)"),
                ("betas[1]", beta2, 0 <= beta2 < 1, "in [0, 1)"),
                ("eps", eps, eps >= 0, ">= 0"),
                ("weight_decay", weight_decay, weight_decay >= 0, ">= 0")):
            if not ok:
                raise ValueError(f"AdamW: {name}={value!r} is invalid; it must be {allowed}")
        self.master = master
        self.backend = backend
        self.lr = float(lr)
        self.betas = (float(beta1), float(beta2))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.adamw_mode = bool(adamw_mode)
        self.exp_avg = backend.zeros(master.shape, np.float32)
        self.exp_avg_sq = backend.zeros(master.shape, np.float32)
        self.step_count = 0

    def step(self, grad, *, lr=None, grad_scale=1.0, out_lowp=None) -> None:
        """One Adam step with ``grad`` (this partition's gradient, divided by ``grad_scale``).

        ``lr`` overrides the constructor's rate for this step (the scheduler's value);
        ``out_lowp`` receives the updated weights in its own dtype (the fp16/bf16 model copy).
        The caller decides whether to step at all: on an fp16 overflow DeepSpeed skips the
        call entirely, so ``step_count`` (Adam's bias-correction step) does not advance.
        """
        self.step_count += 1
        self.backend.adam_step(
            self.master, grad, self.exp_avg, self.exp_avg_sq,
            lr=self.lr if lr is None else float(lr), beta1=self.betas[0], beta2=self.betas[1],
            eps=self.eps, weight_decay=self.weight_decay, step=self.step_count,
            grad_scale=grad_scale, adamw_mode=self.adamw_mode, out_lowp=out_lowp)

    def partitions(self) -> dict:
        """Host copies of this rank's fp32 partitions: master weights and both moments (for checkpoints)."""
        to_np = self.backend.to_numpy
        return {"master": np.array(to_np(self.master), dtype=np.float32, copy=True),
                "exp_avg": np.array(to_np(self.exp_avg), dtype=np.float32, copy=True),
                "exp_avg_sq": np.array(to_np(self.exp_avg_sq), dtype=np.float32, copy=True)}

    def load_partitions(self, parts: dict) -> None:
        """Overwrite master weights and moments in place (the model's parameters may be views of master)."""
        for key in ("master", "exp_avg", "exp_avg_sq"):
            dst = getattr(self, key)
            if parts[key].shape != dst.shape:
                raise ValueError(f"AdamW.load_partitions: {key!r} has shape {parts[key].shape}, the partition "
                                 f"has shape {dst.shape}")
            dst[...] = self.backend.asarray(parts[key])

    _STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")

    def state_dict(self) -> dict:
        """Host copies of the moments and the step count: ``{"exp_avg", "exp_avg_sq", "step"}``."""
        return {
            # np.array(..., copy=True): a snapshot, never a view the next step would overwrite.
            "exp_avg": np.array(self.backend.to_numpy(self.exp_avg), dtype=np.float32, copy=True),
            "exp_avg_sq": np.array(self.backend.to_numpy(self.exp_avg_sq), dtype=np.float32, copy=True),
            "step": int(self.step_count),
        }

    def load_state_dict(self, state) -> None:
        """Restore moments and step count; everything is checked before anything is changed."""
        missing = [k for k in self._STATE_KEYS if k not in state]
        unexpected = sorted(k for k in state if k not in self._STATE_KEYS)
        if missing or unexpected:
            raise ValueError(f"AdamW.load_state_dict: missing keys {missing}, unexpected keys "
                             f"{unexpected}; expected exactly {list(self._STATE_KEYS)}")
        moments = {}
        for key in ("exp_avg", "exp_avg_sq"):
            arr = np.asarray(state[key])
            if arr.shape != self.master.shape:
                raise ValueError(f"AdamW.load_state_dict: {key!r} has shape {arr.shape}, but the "
                                 f"master partition has shape {self.master.shape}")
            moments[key] = arr
        step = state["step"]
        if not isinstance(step, Integral) or step < 0:
            raise ValueError(f"AdamW.load_state_dict: 'step' must be an integer >= 0, got {step!r}")
        xp = self.backend.xp
        self.exp_avg[...] = xp.asarray(moments["exp_avg"], dtype=np.float32)
        self.exp_avg_sq[...] = xp.asarray(moments["exp_avg_sq"], dtype=np.float32)
        self.step_count = int(step)


# ---------------------------------------------------------------------------------------------
# Gradient norm and clipping
# ---------------------------------------------------------------------------------------------

def global_grad_norm(grads, backend, grad_scale=1.0) -> float:
    """L2 norm of all gradients together, unscaled: sqrt(sum of sum_squares) / grad_scale.

    ``grads`` is a list of backend arrays (with ZeRO, the caller sums the squared norms of every
    rank's shard before the square root). inf/nan in any gradient gives an inf/nan norm.
    """
    total = sum(backend.sum_squares(g) for g in grads)
    return math.sqrt(total) / grad_scale


def clip_coefficient(total_norm, max_norm) -> float:
    """The factor gradients are multiplied by: ``torch.nn.utils.clip_grad_norm_`` semantics.

    factor = max_norm / (total_norm + 1e-6), applied only when < 1; ``max_norm <= 0`` means
    clipping is off (DeepSpeed's ``gradient_clipping: 0``) and the factor is 1.0.
    """
    if max_norm <= 0:
        return 1.0
    clip_coef = max_norm / (total_norm + 1e-6)
    return min(clip_coef, 1.0)


# ---------------------------------------------------------------------------------------------
# Loss scaling (deepspeed/runtime/fp16/loss_scaler.py)
# ---------------------------------------------------------------------------------------------

class MinLossScaleError(RuntimeError):
    """An overflow happened with the loss scale already at ``min_scale`` (and raising was asked for)."""


class DynamicLossScaler:
    """DeepSpeed's ``DynamicLossScaler`` (deepspeed/runtime/fp16/loss_scaler.py), same names and rules.

    - An overflow halves ``cur_scale`` (never below ``min_scale``), unless hysteresis still has
      credit: with ``delayed_shift`` = h > 1, the first h-1 overflows only decrement
      ``cur_hysteresis``; once it reaches 1 every further overflow halves the scale.
    - After ``scale_window`` iterations without overflow (counted from the last overflow, or
      from iteration -1 at start), the scale doubles and, by default, the hysteresis credit is
      restored. With ``consecutive_hysteresis`` the credit is restored by any clean iteration.
    - ``cur_iter`` counts ``update_scale`` calls (overflowed or not).
    """

    dynamic = True

    def __init__(self, init_scale=2**16, scale_factor=2.0, scale_window=1000, min_scale=1.0,
                 delayed_shift=1, consecutive_hysteresis=False, raise_error_at_min_scale=False):
        for name, value, ok, allowed in (
                ("init_scale", init_scale, init_scale > 0, "> 0"),
                ("scale_factor", scale_factor, scale_factor > 1, "> 1"),
                ("scale_window", scale_window, isinstance(scale_window, Integral) and scale_window >= 1,
                 "an integer >= 1"),
                ("min_scale", min_scale, min_scale > 0, "> 0"),
                ("delayed_shift", delayed_shift, isinstance(delayed_shift, Integral) and delayed_shift >= 1,
                 "an integer >= 1")):
            if not ok:
                raise ValueError(f"DynamicLossScaler: {name}={value!r} is invalid; it must be {allowed}")
        self.cur_scale = float(init_scale)
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.scale_factor = float(scale_factor)
        self.scale_window = int(scale_window)
        self.min_scale = float(min_scale)
        self.delayed_shift = int(delayed_shift)
        self.cur_hysteresis = int(delayed_shift)
        self.consecutive_hysteresis = bool(consecutive_hysteresis)
        self.raise_error_at_min_scale = bool(raise_error_at_min_scale)

    @property
    def loss_scale(self) -> float:
        return self.cur_scale

    def update_scale(self, overflow: bool) -> None:
        """Advance one iteration; ``overflow`` says whether this iteration's gradients had inf/nan."""
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale and self.raise_error_at_min_scale:
                    raise MinLossScaleError(
                        f"loss scale is already at min_scale={self.min_scale} and gradients still "
                        f"overflow; cannot decrease the scale further")
                self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1              # hysteresis absorbs this overflow
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1

    _STATE_KEYS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis", "scale_factor",
                   "scale_window", "min_scale", "delayed_shift", "consecutive_hysteresis",
                   "raise_error_at_min_scale")

    def state_dict(self) -> dict:
        """All fields as plain Python numbers/bools (JSON-friendly; DeepSpeed pickles the object)."""
        return {"dynamic": True, **{k: getattr(self, k) for k in self._STATE_KEYS}}

    def load_state_dict(self, state) -> None:
        expected = ("dynamic",) + self._STATE_KEYS
        missing = [k for k in expected if k not in state]
        unexpected = sorted(k for k in state if k not in expected)
        if missing or unexpected:
            raise ValueError(f"DynamicLossScaler.load_state_dict: missing keys {missing}, unexpected "
                             f"keys {unexpected}; expected exactly {list(expected)}")
        if state["dynamic"] is not True:
            raise ValueError(f"DynamicLossScaler.load_state_dict: state has dynamic={state['dynamic']!r}, "
                             f"it was saved by a static loss scaler")
        for key in self._STATE_KEYS:
            setattr(self, key, type(getattr(self, key))(state[key]))

    @classmethod
    def from_config(cls, fp16_cfg: dict) -> "DynamicLossScaler":
        """Build from a DeepSpeed ``fp16`` config section, with DeepSpeed's defaults
        (deepspeed/runtime/constants.py: initial_scale_power 16, loss_scale_window 1000,
        hysteresis 2, consecutive_hysteresis false, min_loss_scale 1)."""
        power = fp16_cfg.get("initial_scale_power", 16)
        if not isinstance(power, Integral) or power < 0:
            raise ValueError(f"fp16.initial_scale_power={power!r} is invalid; it must be an integer >= 0")
        return cls(init_scale=2.0 ** power,
                   scale_window=fp16_cfg.get("loss_scale_window", 1000),
                   delayed_shift=fp16_cfg.get("hysteresis", 2),
                   consecutive_hysteresis=fp16_cfg.get("consecutive_hysteresis", False),
                   min_scale=fp16_cfg.get("min_loss_scale", 1))


class StaticLossScaler:
    """DeepSpeed's static ``LossScaler``: a fixed scale (fp16 ``loss_scale > 0``, or 1.0 for fp32/bf16)."""

    dynamic = False

    def __init__(self, loss_scale=1.0):
        if not loss_scale > 0:
            raise ValueError(f"StaticLossScaler: loss_scale={loss_scale!r} is invalid; it must be > 0")
        self.cur_scale = float(loss_scale)

    @property
    def loss_scale(self) -> float:
        return self.cur_scale

    def update_scale(self, overflow: bool) -> None:
        """No-op: a static scale never changes (an overflowed step is still skipped by the caller)."""

    def state_dict(self) -> dict:
        return {"dynamic": False, "cur_scale": self.cur_scale}

    def load_state_dict(self, state) -> None:
        if set(state) != {"dynamic", "cur_scale"} or state["dynamic"] is not False:
            raise ValueError(f"StaticLossScaler.load_state_dict: expected keys ['cur_scale', 'dynamic'] "
                             f"with dynamic=False, got {dict(state)!r}")
        self.cur_scale = float(state["cur_scale"])


def make_loss_scaler(cfg: dict):
    """The loss scaler a full config asks for (DeepSpeed's ``CreateLossScaler`` rule).

    fp16 enabled and ``loss_scale == 0`` (DeepSpeed's default) -> dynamic; fp16 with
    ``loss_scale > 0`` -> static at that value; fp32 or bf16 -> static 1.0 (no scaling).
    """
    fp16 = cfg.get("fp16") or {}
    bf16 = cfg.get("bf16") or {}
    if fp16.get("enabled", False) and bf16.get("enabled", False):
        raise ValueError("fp16.enabled and bf16.enabled are both true; enable at most one")
    if not fp16.get("enabled", False):
        return StaticLossScaler(1.0)
    loss_scale = fp16.get("loss_scale", 0)
    if not isinstance(loss_scale, Real) or loss_scale < 0:
        raise ValueError(f"fp16.loss_scale={loss_scale!r} is invalid; it must be 0 (dynamic) or > 0 (static)")
    if loss_scale == 0:
        return DynamicLossScaler.from_config(fp16)
    return StaticLossScaler(loss_scale)


# ---------------------------------------------------------------------------------------------
# LR schedules (deepspeed/runtime/lr_schedules.py)
# ---------------------------------------------------------------------------------------------

WARMUP_TYPES = ("log", "linear")


class LRScheduler:
    """Base of DeepSpeed's warmup schedules for one parameter group.

    ``last_batch_iteration`` is DeepSpeed's counter: -1 at construction, +1 on every
    ``step()``; DeepSpeed's engine calls ``step()`` after each optimizer step that was not
    skipped for overflow (``deepspeed/runtime/engine.py`` ``_take_model_step``).
    ``get_lr()`` is the rate for the *next* optimizer step.
    """

    def __init__(self, base_lr, last_batch_iteration=-1):
        self.base_lr = float(base_lr)
        self.last_batch_iteration = last_batch_iteration

    def get_lr(self) -> float:
        raise NotImplementedError

    def step(self) -> None:
        self.last_batch_iteration += 1

    def state_dict(self) -> dict:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state) -> None:
        self.last_batch_iteration = int(state["last_batch_iteration"])

    def _warmup_gamma(self) -> float:
        """Warmup progress in [0, 1) for ``last_batch_iteration < warmup_num_steps`` (log or linear)."""
        if self.warmup_type == "log":
            return self.inverse_log_warm_up * math.log(self.last_batch_iteration + 1)
        return self.last_batch_iteration / self.warmup_num_steps

    def _set_warmup(self, warmup_num_steps, warmup_type):
        if not isinstance(warmup_num_steps, Integral) or warmup_num_steps < 0:
            raise ValueError(f"scheduler.params.warmup_num_steps={warmup_num_steps!r} is invalid; "
                             f"it must be an integer >= 0")
        if warmup_type not in WARMUP_TYPES:
            # DeepSpeed logs a warning and falls back to log; we refuse the typo instead.
            raise ValueError(f"scheduler.params.warmup_type={warmup_type!r} is invalid; "
                             f"allowed: {list(WARMUP_TYPES)}")
        self.warmup_num_steps = max(2, warmup_num_steps)   # DeepSpeed: log(1) would divide by 0
        self.warmup_type = warmup_type
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)


class WarmupLR(LRScheduler):
    """DeepSpeed ``WarmupLR``: from warmup_min_lr to warmup_max_lr over warmup_num_steps, then flat.

    lr = min + (max - min) * gamma, gamma = log(i+1)/log(W) ("log") or i/W ("linear") for
    i = last_batch_iteration < W, else 1. ``warmup_max_lr=None`` means the optimizer's lr
    (DeepSpeed's current default). Before the first ``step()`` the lr is warmup_min_lr.
    """

    def __init__(self, base_lr, warmup_min_lr=0.0, warmup_max_lr=None, warmup_num_steps=1000,
                 warmup_type="log", last_batch_iteration=-1):
        super().__init__(base_lr, last_batch_iteration)
        self.min_lr = float(warmup_min_lr)
        self.max_lr = self.base_lr if warmup_max_lr is None else float(warmup_max_lr)
        self.delta_lr = self.max_lr - self.min_lr
        self._set_warmup(warmup_num_steps, warmup_type)

    def get_lr(self) -> float:
        if self.last_batch_iteration < 0:
            return self.min_lr
        return self.min_lr + self.delta_lr * self._get_gamma()

    def _get_gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_gamma()
        return 1.0


class WarmupDecayLR(WarmupLR):
    """DeepSpeed ``WarmupDecayLR``: WarmupLR's warmup, then linear decay back to warmup_min_lr.

    After warmup gamma = max(0, (T - i) / max(1, T - W)), so lr reaches warmup_min_lr (0 by
    default) at i = T = total_num_steps. Note DeepSpeed's default warmup_max_lr here is 0.001,
    not the optimizer's lr.
    """

    def __init__(self, base_lr, total_num_steps, warmup_min_lr=0.0, warmup_max_lr=0.001,
                 warmup_num_steps=1000, warmup_type="log", last_batch_iteration=-1):
        if not isinstance(total_num_steps, Integral) or total_num_steps < 1:
            raise ValueError(f"scheduler.params.total_num_steps={total_num_steps!r} is invalid; "
                             f"it must be an integer >= 1")
        self.total_num_steps = int(total_num_steps)
        super().__init__(base_lr, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)

    def _get_gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_gamma()
        return max(0.0, float(self.total_num_steps - self.last_batch_iteration)
                   / float(max(1.0, self.total_num_steps - self.warmup_num_steps)))


class WarmupCosineLR(LRScheduler):
    """DeepSpeed ``WarmupCosineLR``: ratios of the optimizer's lr; warmup, then cosine decay.

    ratio = r0 + (1 - r0) * gamma during warmup (r0 = warmup_min_ratio), then with
    s = i - W + 1 and S = T - W: ratio = max(0, c + (1 - c) * (1 + cos(pi * s / S)) / 2)
    (c = cos_min_ratio). Before the first ``step()`` the lr is 0.0, as in DeepSpeed. Like
    DeepSpeed, the cosine is not clamped: past i = T - 1 the ratio rises again.
    """

    def __init__(self, base_lr, total_num_steps, warmup_min_ratio=0.0, warmup_num_steps=1000,
                 cos_min_ratio=0.0001, warmup_type="log", last_batch_iteration=-1):
        super().__init__(base_lr, last_batch_iteration)
        self._set_warmup(warmup_num_steps, warmup_type)
        for name, value in (("warmup_min_ratio", warmup_min_ratio), ("cos_min_ratio", cos_min_ratio)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"scheduler.params.{name}={value!r} is invalid; it must be in [0, 1]")
        if not isinstance(total_num_steps, Integral) or total_num_steps < 1:
            raise ValueError(f"scheduler.params.total_num_steps={total_num_steps!r} is invalid; it must "
                             f"be an integer >= 1")
        # total_num_steps <= warmup_num_steps: DeepSpeed warns and the run stays in warmup; so do we
        # (get_lr_ratio guards the division DeepSpeed would make by zero past the warmup).
        self.total_num_steps = int(total_num_steps)
        self.warmup_min_ratio = float(warmup_min_ratio)
        self.cos_min_ratio = float(cos_min_ratio)

    def get_lr_ratio(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            ratio = self._warmup_gamma()
            return self.warmup_min_ratio + ratio * (1.0 - self.warmup_min_ratio)
        real_last_step = self.last_batch_iteration - self.warmup_num_steps + 1
        real_total_steps = max(1, self.total_num_steps - self.warmup_num_steps)
        ratio = (1 + math.cos(math.pi * real_last_step / real_total_steps)) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * ratio)

    def get_lr(self) -> float:
        if self.last_batch_iteration < 0:
            return 0.0
        return self.base_lr * self.get_lr_ratio()


SCHEDULERS = {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR}

_SCHEDULER_PARAMS = {
    "WarmupLR": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"),
    "WarmupDecayLR": ("total_num_steps", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps",
                      "warmup_type"),
    "WarmupCosineLR": ("total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio",
                       "warmup_type"),
}


def make_scheduler(scheduler_cfg: dict, base_lr: float) -> LRScheduler:
    """Build a schedule from a DeepSpeed ``scheduler`` section: ``{"type": ..., "params": {...}}``."""
    kind = scheduler_cfg.get("type")
    if kind not in SCHEDULERS:
        raise ValueError(f"scheduler.type={kind!r} is not supported; allowed: {list(SCHEDULERS)}")
    extra = sorted(set(scheduler_cfg) - {"type", "params"})
    if extra:
        raise ValueError(f"scheduler: unknown keys {extra}; allowed: ['params', 'type']")
    params = dict(scheduler_cfg.get("params") or {})
    allowed = _SCHEDULER_PARAMS[kind]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"scheduler.params: unknown keys {unknown} for {kind}; allowed: {list(allowed)}")
    if kind != "WarmupLR" and "total_num_steps" not in params:
        raise ValueError(f"scheduler.params.total_num_steps is required for {kind}")
    return SCHEDULERS[kind](base_lr, **params)


def lr_at(step: int, scheduler_cfg: dict | None, base_lr: float) -> float:
    """The learning rate used by the 0-based optimizer step ``step`` (a pure function, so resume is exact).

    Mapping to DeepSpeed: the scheduler starts at ``last_batch_iteration = -1`` and the engine
    calls ``scheduler.step()`` *after* each applied optimizer step, so optimizer step k runs with
    ``get_lr()`` at ``last_batch_iteration = k - 1``. Step 0 therefore gets the constructor's
    value (WarmupLR/WarmupDecayLR: warmup_min_lr; WarmupCosineLR: 0.0) and step 1 gets the
    schedule's i = 0 value (which for the log and linear warmups is the same minimum).
    ``step`` counts applied optimizer steps only: DeepSpeed does not advance the scheduler on a
    step skipped for fp16 overflow. ``scheduler_cfg=None`` means a constant ``base_lr``.
    """
    if not isinstance(step, Integral) or step < 0:
        raise ValueError(f"lr_at: step must be an integer >= 0, got {step!r}")
    if scheduler_cfg is None:
        return float(base_lr)
    scheduler = make_scheduler(scheduler_cfg, base_lr)
    scheduler.last_batch_iteration = int(step) - 1
    return scheduler.get_lr()
