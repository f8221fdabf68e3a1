"""Property-based equivalence tests: every registered backend against the NumPy reference kernels
(DESIGN.md, "Tests and benchmarks"). A package, so test_meta.py can import the test modules."""
