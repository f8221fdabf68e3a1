"""AdamW on flat fp32 partitions and gradient clipping.

ZeRO-Infinity (Rajbhandari et al., SC'21, §5) keeps, on every rank, an fp32 master copy of its
shard of the parameters plus the two Adam moments, all as flat contiguous partitions; the
optimizer step runs on those partitions and writes back a low-precision copy of the weights.
`AdamW` is that per-partition optimizer; the arithmetic is the backend's fused ``adam_step``
kernel (the reference is ``refimpl/kernels/optim.py``).

The rest reproduces DeepSpeed's training-loop numerics, with DeepSpeed's names and config keys:

- `clip_coefficient` (of the global norm the engine sums over ranks): ``torch.nn.utils.clip_grad_norm_`` semantics, as
  DeepSpeed's ``gradient_clipping`` uses them (the factor is folded into Adam's ``grad_scale``
  together with the loss scale, as in ``deepspeed/runtime/zero/stage_1_and_2.py``
  ``unscale_and_clip_grads``).
- loss scaling: refimpl/loss_scaler.py (``deepspeed/runtime/fp16/loss_scaler.py``);
- LR schedules: refimpl/lr_schedules.py (``deepspeed/runtime/lr_schedules.py``).
"""

from dataclasses import asdict, dataclass

import numpy as np

# loss scaling and LR schedules have their own files (as in DeepSpeed); their names are re-exported here
from .loss_scaler import DynamicLossScaler, MinLossScaleError, StaticLossScaler, make_loss_scaler  # noqa: F401
from .lr_schedules import (SCHEDULERS, WARMUP_TYPES, LRScheduler, WarmupCosineLR, WarmupDecayLR,  # noqa: F401
                           WarmupLR, lr_at, make_scheduler)


# ---------------------------------------------------------------------------------------------
# AdamW on a flat fp32 partition
# ---------------------------------------------------------------------------------------------

class AdamW:
    """AdamW on flat fp32 master weights (ZeRO-Infinity §5 keeps fp32 master + moments as flat partitions).

    ``master`` is a flat float32 backend array (the fp32 master weights, possibly this rank's
    shard; float64 in the fp64 reference run); it is updated in place. ``exp_avg`` / ``exp_avg_sq``
    are allocated as zeros of its dtype, as torch does lazily on the first step. ``backend``
    supplies ``adam_step``, ``zeros``, ``xp`` and ``to_numpy``. ``adamw_mode`` and
    ``bias_correction`` are DeepSpeed's (see ``adam_w_mode`` for how a config chooses the mode).
    """

    def __init__(self, master, *, backend, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.01, adamw_mode=True, bias_correction=True):
        if master.ndim != 1 or master.dtype not in (np.float32, np.float64):
            raise ValueError(f"AdamW: master must be a flat float32 (or float64) array, got shape {master.shape} "
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
        self.adamw_mode, self.bias_correction = bool(adamw_mode), bool(bias_correction)
        self.exp_avg = backend.zeros(master.shape, master.dtype)
        self.exp_avg_sq = backend.zeros(master.shape, master.dtype)
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
            grad_scale=grad_scale, adamw_mode=self.adamw_mode, bias_correction=self.bias_correction,
            out_lowp=out_lowp)

    def partitions(self) -> dict:
        """Host copies of this rank's fp32 partitions: master weights and both moments (for checkpoints)."""
        to_np, dt = self.backend.to_numpy, self.master.dtype
        return {"master": np.array(to_np(self.master), dtype=dt, copy=True),
                "exp_avg": np.array(to_np(self.exp_avg), dtype=dt, copy=True),
                "exp_avg_sq": np.array(to_np(self.exp_avg_sq), dtype=dt, copy=True)}

    def load_partitions(self, parts: dict) -> None:
        """Overwrite master weights and moments in place (the model's parameters may be views of master)."""
        for key in ("master", "exp_avg", "exp_avg_sq"):
            dst = getattr(self, key)
            if parts[key].shape != dst.shape:
                raise ValueError(f"AdamW.load_partitions: {key!r} has shape {parts[key].shape}, the partition "
                                 f"has shape {dst.shape}")
            dst[...] = self.backend.asarray(parts[key])


@dataclass(frozen=True)
class AdamConfig:
    """The ``optimizer`` section as AdamW's keyword arguments (DeepSpeed's FusedAdam / DeepSpeedCPUAdam)."""
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    adamw_mode: bool = True
    bias_correction: bool = True

    @classmethod
    def from_section(cls, optimizer_cfg: dict) -> "AdamConfig":
        p = optimizer_cfg["params"]
        return cls(p["lr"], tuple(p["betas"]), p["eps"], p["weight_decay"], adam_w_mode(optimizer_cfg),
                   p["bias_correction"])

    def kwargs(self) -> dict:
        return asdict(self)


def adam_w_mode(optimizer_cfg: dict) -> bool:
    """Decoupled weight decay (AdamW) or L2 (Adam), by DeepSpeed's rule for an ``optimizer`` config section
    (deepspeed/runtime/engine.py ``_configure_basic_optimizer``): type "AdamW" always decouples; type "Adam"
    decouples unless ``params.adam_w_mode`` is false (its default is true). ``torch_adam`` picks
    torch.optim.AdamW or torch.optim.Adam by the same flag, so it does not change the rule."""
    return optimizer_cfg["type"].lower() == "adamw" or bool(optimizer_cfg["params"].get("adam_w_mode", True))


# ---------------------------------------------------------------------------------------------
# Gradient norm and clipping
# ---------------------------------------------------------------------------------------------

def clip_coefficient(total_norm, max_norm) -> float:
    """The factor gradients are multiplied by: ``torch.nn.utils.clip_grad_norm_`` semantics.

    factor = max_norm / (total_norm + 1e-6), applied only when < 1; ``max_norm <= 0`` means
    clipping is off (DeepSpeed's ``gradient_clipping: 0``) and the factor is 1.0.
    """
    if max_norm <= 0:
        return 1.0
    clip_coef = max_norm / (total_norm + 1e-6)
    return min(clip_coef, 1.0)
