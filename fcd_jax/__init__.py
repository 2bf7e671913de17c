"""fcd-jax: feature-constrained distillation (FCD) for visual anomaly detection in JAX/Flax."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``fcd_jax.Detector`` imported on first use, so ``import fcd_jax`` stays light."""
    if name == "Detector":
        from fcd_jax.detector import Detector

        return Detector
    raise AttributeError(f"module 'fcd_jax' has no attribute {name!r}")
