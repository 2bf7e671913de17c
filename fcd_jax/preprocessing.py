"""On-device preprocessing: uint8 images as the host holds them -> the ViT's normalised input.

Runs inside the jitted programs (the train step, the teacher-cache fill, the score step), once
per batch; the host only slices uint8 batches (``fcd_jax.input_pipeline``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def preprocess(images_uint8: jax.Array, data_config: Any) -> jax.Array:
    """uint8 ``[n, h, w, c]`` (c = 1 or 3) or ``[n, h, w]`` -> float32 ``[n, size, size, 3]``,
    size = ``data_config.image_size``.

    Bilinear resize (``jax.image.resize``), gray replicated to 3 channels, ``(x / 255 - mean) /
    std`` with ``data_config.mean`` and ``std``, the teacher's (a scalar or one per channel;
    ``fcd_jax.teacher`` fills them from the checkpoint: Google's ViTs take 0.5 and 0.5, i.e.
    [-1, 1]). Use inside jit.
    """
    image_size = int(data_config.image_size)
    images = jnp.asarray(images_uint8).astype(jnp.float32)
    if images.ndim == 3:
        images = images[..., None]
    n, height, width, channels = images.shape
    if (height, width) != (image_size, image_size):
        images = jax.image.resize(images, (n, image_size, image_size, channels), "bilinear")
    if channels == 1:
        images = jnp.repeat(images, 3, axis=-1)
    mean = jnp.asarray(data_config.mean, jnp.float32)
    std = jnp.asarray(data_config.std, jnp.float32)
    return (images / 255.0 - mean) / std
