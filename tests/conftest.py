"""Shared pytest configuration: one torch thread per test process and deterministic hypothesis runs (reproducible CI)."""
import os
import torch
from hypothesis import HealthCheck, settings

# One intra-op thread per test process: the tests use small tensors, and several pytest-xdist workers each running
# torch's default thread pool on a small machine oversubscribe the cores (OpenMP spin-waits made data generation
# ~50x slower in that case). Tests about thread counts set them explicitly. Override with SO8LAB_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("SO8LAB_TEST_THREADS", "1")))

# derandomize: examples are a fixed function of each test, so every run (and every xdist worker) sees the same
# cases; no example database, so nothing is replayed from earlier local runs. HYPOTHESIS_PROFILE=thorough runs more.
settings.register_profile("ci", derandomize=True, database=None, max_examples=80, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
