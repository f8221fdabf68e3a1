"""Learning-rate schedules, as DeepSpeed defines them (deepspeed/runtime/lr_schedules.py).

WarmupLR, WarmupDecayLR and WarmupCosineLR with DeepSpeed's parameter names and formulas; `lr_at(step)` is the
pure function of the step the engine uses, so a resumed run gets exactly the learning rates it would have had.
"""
import math
from numbers import Integral


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
        if not isinstance(warmup_num_steps, Integral) or warmup_num_steps < 1:   # DeepSpeed 0.19.8 raises too
            raise ValueError(f"scheduler.params.warmup_num_steps={warmup_num_steps!r} is invalid; "
                             f"it must be an integer >= 1")
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
    s = i - W + 1 and S = max(1, T - W): ratio = max(0, c + (1 - c) * (1 + cos(pi * min(1, s / S))) / 2)
    (c = cos_min_ratio). Before the first ``step()`` the lr is 0.0, as in DeepSpeed. As in DeepSpeed
    0.19.8, the cosine progress is clamped at 1: from i = T - 1 on (and right after the warmup when
    T <= W) the ratio stays at cos_min_ratio.
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
        # total_num_steps <= warmup_num_steps: DeepSpeed warns, warms up, then holds cos_min_ratio; so do we.
        self.total_num_steps = int(total_num_steps)
        self.warmup_min_ratio = float(warmup_min_ratio)
        self.cos_min_ratio = float(cos_min_ratio)

    def get_lr_ratio(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            ratio = self._warmup_gamma()
            return self.warmup_min_ratio + ratio * (1.0 - self.warmup_min_ratio)
        real_last_step = self.last_batch_iteration - self.warmup_num_steps + 1
        real_total_steps = max(1, self.total_num_steps - self.warmup_num_steps)
        progress = min(1.0, real_last_step / real_total_steps)   # past the end: hold the floor
        ratio = (1 + math.cos(math.pi * progress)) / 2
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
