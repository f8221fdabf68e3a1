"""Bridges from refimpl to other frameworks (for cross-checks): ``refimpl.interop.torch``."""
