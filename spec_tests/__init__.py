"""Property-based equivalence tests: every registered backend against the NumPy reference kernels
(docs/architecture.md, "Numerics and tests"). A package, so test_meta.py can import the test modules."""
