"""Shared test setup. Environment first: it must be set before torch or jax is imported."""

import os

# OpenMP spin-waiting makes eager PyTorch 5-8x slower on small machines.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
