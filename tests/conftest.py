"""Shared test setup. Environment first: it must be set before torch or jax is imported."""

import os
import tempfile

# OpenMP spin-waiting makes eager PyTorch 5-8x slower on small machines.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Compiled programs are cached on disk and shared by the test processes (xdist workers, CLI
# subprocesses): many tests compile the same tiny train step, and compiling dominates their time.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fcd_jax_test_compile_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
