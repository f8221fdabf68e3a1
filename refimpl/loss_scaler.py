"""Loss scaling for fp16 training, as DeepSpeed does it (deepspeed/runtime/fp16/loss_scaler.py).

Mixed-precision training (Micikevicius et al. 2018) multiplies the loss by a scale so small fp16 gradients do
not flush to zero; an inf/nan gradient means the scale was too big: the step is skipped and the scale drops.
`DynamicLossScaler.update_scale` is DeepSpeed's rule (hysteresis, scale window, minimum), with DeepSpeed's names
and the defaults of the ``fp16`` config section (deepspeed/runtime/constants.py).
"""
from numbers import Integral, Real


class MinLossScaleError(RuntimeError):
    """An overflow happened with the loss scale already at ``min_scale`` (and raising was asked for)."""


class DynamicLossScaler:
    """DeepSpeed's ``DynamicLossScaler`` (deepspeed/runtime/fp16/loss_scaler.py), same names and rules.

    - An overflow halves ``cur_scale`` (never below ``min_scale``), unless hysteresis still has
      credit: with ``delayed_shift`` = h > 1, the first h-1 overflows only decrement
      ``cur_hysteresis``; once it reaches 1 every further overflow halves the scale.
    - With s = cur_iter - last_overflow_iter - 1 (last_overflow_iter is -1 at start), a clean
      iteration with s > 0 and s % scale_window == 0 doubles the scale and, by default, restores
      the hysteresis credit: the first doubling comes on the (scale_window + 1)-th clean
      iteration. With ``consecutive_hysteresis`` the credit is restored by any clean iteration.
    - An overflow with the scale already at ``min_scale`` (and no hysteresis credit) raises
      ``MinLossScaleError``, as DeepSpeed's engine does (its ``raise_error_at_min_scale`` default).
    - ``cur_iter`` counts ``update_scale`` calls (overflowed or not).
    """

    dynamic = True

    def __init__(self, init_scale=2**16, scale_factor=2.0, scale_window=1000, min_scale=1.0,
                 delayed_shift=1, consecutive_hysteresis=False, raise_error_at_min_scale=True):
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
            # clean iterations since the last overflow, not counting this one: the scale doubles on the
            # (scale_window + 1)-th clean iteration, then every scale_window more
            stable_interval = (self.cur_iter - self.last_overflow_iter) - 1
            if stable_interval > 0 and stable_interval % self.scale_window == 0:
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
        bad = [k for k in self._STATE_KEYS if not isinstance(state[k], (int, float)) or state[k] != state[k]
               or abs(state[k]) == float("inf")]
        if bad:
            raise ValueError(f"DynamicLossScaler.load_state_dict: {bad[0]}={state[bad[0]]!r} is not a finite number")
        # the constructor's range checks (scale > 0, window >= 1, ...) on the loaded values
        DynamicLossScaler(init_scale=state["cur_scale"], scale_factor=state["scale_factor"],
                          scale_window=state["scale_window"], min_scale=state["min_scale"],
                          delayed_shift=state["delayed_shift"])
        if not 1 <= state["cur_hysteresis"] <= state["delayed_shift"] or state["cur_iter"] < 0:
            raise ValueError(f"DynamicLossScaler.load_state_dict: cur_hysteresis={state['cur_hysteresis']!r} "
                             f"must be in 1..delayed_shift and cur_iter={state['cur_iter']!r} >= 0")
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
        if not (isinstance(loss_scale, Real) and 0 < loss_scale < float("inf")):
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
        if not (isinstance(state["cur_scale"], Real) and 0 < state["cur_scale"] < float("inf")):
            raise ValueError(f"StaticLossScaler.load_state_dict: cur_scale={state['cur_scale']!r} is invalid; "
                             f"it must be a finite number > 0")
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
