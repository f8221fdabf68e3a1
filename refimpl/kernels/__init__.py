"""The NumPy reference kernels: the specification every backend is tested against.

Each kernel is a pure function of arrays, written against an array namespace taken from its inputs
(`_xp`, Chainer's get_array_module pattern) so that a backend that does not override a kernel still
runs it on its own arrays (CuPy arrays run these same lines on the GPU).

- dense.py      matmul, softmax, layernorm, gelu, embedding, cross-entropy (forward and backward)
- attention.py  plain and tiled (FlashAttention) attention, forward and backward
- optim.py      fused AdamW step, sum of squares, inf/nan check, cast
"""

import numpy as _np


def array_module(a):
    """Chainer's get_array_module: cupy for CuPy arrays, numpy for everything else."""
    if type(a).__module__.startswith("cupy"):
        import cupy
        return cupy
    return _np
