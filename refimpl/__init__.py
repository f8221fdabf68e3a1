"""refimpl: a readable NumPy reference implementation of ZeRO-Infinity (Rajbhandari et al., SC21).

Start with docs/architecture.md for the map of the code.
"""
from .autodiff import Tensor, backward, no_grad
from .backend import Backend, BackendError, available_backends, get_backend, use_backend

__version__ = "0.1.0"
__all__ = ["Backend", "BackendError", "Tensor", "available_backends", "backward", "get_backend", "no_grad",
           "use_backend"]
