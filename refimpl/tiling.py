"""Memory-centric tiling: one huge linear layer as a grid of small ones (ZeRO-Infinity §5.1.3).

ZeRO stage 3 gathers a module's parameters just before it runs and releases them right after, so the
working memory of parameters is one module at a time. A single linear layer can still be too big for that
(a 100K-wide vocabulary head, a huge MLP): ZeRO-Infinity's answer is to cut it into tiles that are separate
modules with separate, separately partitioned parameters, run one after another. The working memory is
then one tile, not the layer, with no model parallelism and no change to the numbers (§5.1.3:
"memory-centric tiling ... without having to resort to model parallelism").

The layout follows DeepSpeed's `deepspeed/runtime/zero/tiling.py` (`TiledLinear`):

    W (out_features, in_features) cut into out_splits x in_splits tiles:

                    in_parts[0]  in_parts[1] ... in_parts[in_splits]
    out_parts[0]   [ linears[0][0] | linears[0][1] | ... ]     y[..., out_parts[0]:out_parts[1]]
    out_parts[1]   [ linears[1][0] | linears[1][1] | ... ]       = sum_i linears[0][i](x_i)
        ...

    x (..., in_features) is split along its last dim into x_0 .. x_{in_splits-1};
    out-split o's output is the sum over in-splits i of linears[o][i](x_i);
    the out-splits' outputs are concatenated along the last dim.

Only the last in-split of each row carries a bias (the partial sums must add it exactly once). Split sizes
are numpy.array_split's (the first `n % k` pieces are one larger), so splits need not divide the features.
The splitting and concatenation are differentiable `Function`s defined here, forward and backward side by
side.
"""
from __future__ import annotations

import numpy as np

from . import functional as F
from .autodiff import Function
from .backend import get_backend
from .nn import Linear, Module, ModuleList, _init


# ------------------------------------------------------------------------------------ differentiable ops
class SplitLastDim(Function):
    """x (..., sum(sizes)) -> one piece (..., sizes[k]) per size (DeepSpeed's split_tensor_along_last_dim)."""

    def forward(self, x, sizes):
        self.in_shape, self.in_dtype, self.sizes = x.shape, x.dtype, tuple(sizes)
        offsets = np.cumsum(self.sizes)[:-1]
        return tuple(self.backend.xp.split(x, offsets, axis=-1))   # views of x; nothing writes into them

    def backward(self, *grads):
        # a piece nobody used gets no gradient: it contributes zeros to dx
        xp = self.backend.xp
        parts = [g if g is not None else xp.zeros((*self.in_shape[:-1], n), self.in_dtype)
                 for g, n in zip(grads, self.sizes)]
        return xp.concatenate(parts, axis=-1), None                 # (..., sum(sizes))


class ConcatLastDim(Function):
    """xs[k] (..., n_k) -> (..., sum n_k), torch.cat(xs, dim=-1)."""

    def forward(self, *xs):
        self.sizes = [x.shape[-1] for x in xs]
        return self.backend.xp.concatenate(xs, axis=-1)

    def backward(self, g):
        xp = self.backend.xp
        offsets = np.cumsum(self.sizes)[:-1]
        # contiguous copies, not views of g: a piece may end up as some leaf's .grad
        return tuple(xp.ascontiguousarray(piece) for piece in xp.split(g, offsets, axis=-1))


def split_last_dim(x, sizes):
    return SplitLastDim.apply(x, tuple(int(n) for n in sizes))


def concat_last_dim(xs):
    return ConcatLastDim.apply(*xs)


# ------------------------------------------------------------------------------------------- the module
def _parts(num_items: int, num_parts: int) -> list[int]:
    """CSR-style boundaries [0, end of part 0, ..., num_items] of numpy.array_split's sizes."""
    sizes = [len(a) for a in np.array_split(np.arange(num_items), num_parts)]
    return [0, *np.cumsum(sizes).tolist()]


def _check_splits(name: str, splits, features: int) -> None:
    if isinstance(splits, bool) or not isinstance(splits, (int, np.integer)) or not 1 <= splits <= features:
        raise ValueError(f"{name} must be an integer in [1, {features}] (the number of features it splits), "
                         f"got {splits!r}")


class TiledLinear(Module):
    """A drop-in replacement for `Linear` (y = x W^T + b) whose weight is `out_splits x in_splits` Linear tiles.

    Each tile is its own module, so ZeRO stage 3's hooks gather and release one tile at a time (ZeRO-Infinity
    §5.1.3). With the same `rng` it draws the same weights as `Linear(in_features, out_features, rng=rng)`
    and leaves `rng` in the same state, so swapping one for the other keeps every other weight of a model.
    rng may be None with std=0 (zero weights, to be overwritten: what `from_linear` does).

    input_is_already_split: forward takes a list of `in_splits` pieces instead of one tensor.
    combine_out_splits: False returns the list of `out_splits` outputs instead of their concatenation.
    (Both as in DeepSpeed: a chain of tiled layers can pass pieces along without re-assembling them.)
    """

    def __init__(self, in_features, out_features, bias=True, *, in_splits=1, out_splits=1, rng, std=0.02,
                 dtype=np.float32, input_is_already_split=False, combine_out_splits=True):
        super().__init__()
        _check_splits("in_splits", in_splits, in_features)
        _check_splits("out_splits", out_splits, out_features)
        if rng is None and std > 0:
            raise ValueError(f"rng=None only works with std=0 (zero weights, as from_linear uses), got std={std}")
        self.in_features, self.out_features, self.use_bias = in_features, out_features, bool(bias)
        self.in_splits, self.out_splits = int(in_splits), int(out_splits)
        self.input_is_already_split, self.combine_out_splits = input_is_already_split, combine_out_splits
        # in_parts[p] is where input split p starts, in_parts[p + 1] where it ends (exclusive)
        self.in_parts = _parts(in_features, self.in_splits)
        self.out_parts = _parts(out_features, self.out_splits)
        self.in_sizes = [b - a for a, b in zip(self.in_parts, self.in_parts[1:])]
        self.out_sizes = [b - a for a, b in zip(self.out_parts, self.out_parts[1:])]

        rows = []
        for out_id in range(self.out_splits):
            row = []
            for in_id in range(self.in_splits):
                local_bias = self.use_bias and in_id == self.in_splits - 1   # one bias per output row
                # std=0: zeros, and no draw from rng; the weights are filled in below
                row.append(Linear(self.in_sizes[in_id], self.out_sizes[out_id], bias=local_bias,
                                  rng=None, std=0.0, dtype=dtype))
            rows.append(ModuleList(row))
        self.linears = ModuleList(rows)

        # Draw the whole weight as Linear would (same rng draws, same values), then cut it into the tiles.
        weight = _init(rng, (out_features, in_features), std, dtype)       # (out, in)
        bias_values = _init(rng, (out_features,), 0.0, dtype) if self.use_bias else None
        self._copy_tiles(weight, bias_values)

    @classmethod
    def from_linear(cls, linear: Linear, in_splits, out_splits, **kwargs) -> "TiledLinear":
        """The same layer as `linear`, tiled (DeepSpeed's `init_linear=` / `copy_params_from`)."""
        tiled = cls(linear.in_features, linear.out_features, linear.bias is not None, in_splits=in_splits,
                    out_splits=out_splits, rng=None, std=0.0, dtype=linear.weight.dtype, **kwargs)
        tiled.copy_params_from(linear)
        return tiled

    def copy_params_from(self, other: Linear) -> None:
        """Copy `other`'s weight and bias into the tiles. Both must be whole (not partitioned by ZeRO-3)."""
        want = (self.out_features, self.in_features)
        if tuple(other.weight.shape) != want:
            raise ValueError(f"cannot copy a weight of shape {tuple(other.weight.shape)} into a TiledLinear of "
                             f"shape {want} (a ZeRO-3 partitioned Linear must be gathered first)")
        if (other.bias is not None) != self.use_bias:
            raise ValueError(f"bias mismatch: the TiledLinear has bias={self.use_bias}, the Linear has "
                             f"bias={other.bias is not None}")
        from .deferred_init import materialize   # a deferred Linear is drawn here
        self._copy_tiles(materialize(other.weight.data), None if other.bias is None else materialize(other.bias.data))

    def _copy_tiles(self, weight, bias) -> None:
        for out_id in range(self.out_splits):
            r0, r1 = self.out_parts[out_id], self.out_parts[out_id + 1]
            for in_id in range(self.in_splits):
                c0, c1 = self.in_parts[in_id], self.in_parts[in_id + 1]
                local = self.linears[out_id][in_id]
                local.weight.data[...] = weight[r0:r1, c0:c1]
                if local.bias is not None:
                    local.bias.data[...] = bias[r0:r1]

    def to_linear(self) -> Linear:
        """One Linear with the tiles' weights put back together (for checks; needs whole parameters)."""
        xp = get_backend().xp
        tiles = [[self.linears[o][i].weight.data for i in range(self.in_splits)] for o in range(self.out_splits)]
        linear = Linear(self.in_features, self.out_features, self.use_bias, rng=None, std=0.0,
                        dtype=tiles[0][0].dtype)
        linear.weight.data[...] = xp.concatenate([xp.concatenate(row, axis=1) for row in tiles], axis=0)
        if self.use_bias:
            linear.bias.data[...] = xp.concatenate(
                [self.linears[o][self.in_splits - 1].bias.data for o in range(self.out_splits)])
        return linear

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, x):
        inputs = self._split_input(x)
        outputs = []
        # Tile by tile, in DeepSpeed's order; under ZeRO-3 each call gathers, runs and releases one tile.
        for out_id in range(self.out_splits):
            out = None
            for in_id in range(self.in_splits):
                local = self.linears[out_id][in_id](inputs[in_id])     # (..., out_sizes[out_id])
                out = local if out is None else F.add(out, local)      # partial sums over the in-splits
            outputs.append(out)
        if not self.combine_out_splits:
            return outputs
        return outputs[0] if self.out_splits == 1 else concat_last_dim(outputs)   # (..., out_features)

    def _split_input(self, x) -> list:
        if self.input_is_already_split:
            if len(x) != self.in_splits or any(p.shape[-1] != n for p, n in zip(x, self.in_sizes)):
                raise ValueError(f"expected {self.in_splits} input pieces with last dims {self.in_sizes}, got "
                                 f"{[p.shape[-1] for p in x]}")
            return list(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has last dim {x.shape[-1]}, TiledLinear expects in_features="
                             f"{self.in_features}")
        return [x] if self.in_splits == 1 else list(split_last_dim(x, self.in_sizes))

    def __repr__(self):
        return (f"TiledLinear(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.use_bias}, in_splits={self.in_splits}, out_splits={self.out_splits})")
