"""Hypothesis profiles shared by tests/ and spec_tests/ (select with HYPOTHESIS_PROFILE)."""
import os

# Simulated ranks are threads; with a multi-threaded BLAS each would spawn one BLAS thread per core, and on a
# 2-core machine they fight. Must be set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=15, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
