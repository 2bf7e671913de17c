"""Benchmarks of fcd-jax against a PyTorch implementation of the same method (BENCHMARKS.md)."""
