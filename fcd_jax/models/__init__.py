"""Model definitions: one small file per model."""

from fcd_jax.models.vit import (
    VARIANTS,
    ViT,
    build_vit,
    init_params,
    parse_variant,
    truncate_params,
)

__all__ = ["VARIANTS", "ViT", "build_vit", "init_params", "parse_variant", "truncate_params"]
