"""VGG16 (Simonyan & Zisserman, ICLR 2015) and MKDAD's cloner, returning every ReLU output.

METHOD.md "The paper's ablations": the VGG teacher is torchvision's VGG16 without batch norm (only
its ``features``: 13 conv3x3 + ReLU, max-pools between the 5 blocks); the student is MKDAD's
cloner (Salehi et al., CVPR 2021): the same VGG shape, convolutions without bias, batch norm, and
widths ``equal`` (the teacher's) or ``small`` (MKDAD's narrow config). As in MKDAD's cloner, batch
norm follows every convolution except the last of each block (the ones a max-pool follows).

``apply`` returns ``{"taps": (relu1_1, relu1_2, relu2_1, ..., relu5_3)}``: the 13 ReLU outputs,
NHWC, in order (0-based tap c is ``TAP_NAMES[c]``). The final max-pool feeds no tap and is not run.
Batch norm uses its running statistics (``batch_stats``) unless ``train=True``; then it uses the
batch's and updates them (``apply(..., train=True, mutable=["batch_stats"])``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcd_jax.errors import ConfigError

POOL = "M"
# Output channels of each conv, POOL = 2x2 max-pool (torchvision's cfg "D").
VGG16_WIDTHS: tuple[int | str, ...] = (
    64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL,
)
CLONER_WIDTHS: dict[str, tuple[int | str, ...]] = {
    "equal": VGG16_WIDTHS,
    "small": (16, 16, POOL, 16, 128, POOL, 16, 16, 256, POOL, 16, 16, 512, POOL, 16, 16, 512, POOL),
}
# torch BatchNorm2d defaults (eps 1e-5, running-average momentum 0.1 = Flax's 0.9).
BATCH_NORM_EPS = 1e-5
BATCH_NORM_MOMENTUM = 0.9


def batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
    """torch-style BatchNorm2d: batch statistics (and their running update) only when ``train``."""
    return nn.BatchNorm(
        use_running_average=not train, momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPS,
        dtype=dtype, name=name,
    )


def conv_names(widths: tuple[int | str, ...]) -> tuple[str, ...]:
    """``conv{block}_{index}`` of every conv in ``widths``, 1-based as in the VGG paper."""
    names, block, index = [], 1, 0
    for width in widths:
        if width == POOL:
            block, index = block + 1, 0
        else:
            index += 1
            names.append(f"conv{block}_{index}")
    return tuple(names)


def conv_widths(widths: tuple[int | str, ...]) -> tuple[int, ...]:
    """The output channels of each conv (each tap) in ``widths``, pools left out."""
    return tuple(int(width) for width in widths if width != POOL)


TAP_NAMES = tuple(name.replace("conv", "relu") for name in conv_names(VGG16_WIDTHS))


class VGG(nn.Module):
    """VGG features; input NHWC images, already normalised (ImageNet mean/std for torchvision)."""

    widths: tuple[int | str, ...] = VGG16_WIDTHS
    batch_norm: bool = False
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, tuple[jax.Array, ...]]:
        names = iter(conv_names(self.widths))
        features, taps = images.astype(self.dtype), []
        for position, width in enumerate(self.widths):
            if width == POOL:
                if position < len(self.widths) - 1:  # the last pool feeds no tap
                    features = nn.max_pool(features, (2, 2), strides=(2, 2))
                continue
            name = next(names)
            features = nn.Conv(
                int(width), (3, 3), padding=((1, 1), (1, 1)), use_bias=self.use_bias,
                kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype, name=name,
            )(features)
            before_pool = position + 1 < len(self.widths) and self.widths[position + 1] == POOL
            if self.batch_norm and not before_pool:
                features = batch_norm(train, self.dtype, name.replace("conv", "bn"))(features)
            features = nn.relu(features)
            taps.append(features)
        return {"taps": tuple(taps)}


def narrowed(widths: tuple[int | str, ...], divisor: int) -> tuple[int | str, ...]:
    """``widths`` with every conv ``divisor`` times narrower (at least 1 channel): the tiny
    networks of tests and demos with a random teacher (``model.cnn_width_divisor``); 1 keeps
    torchvision's widths, the only ones a pretrained checkpoint fits."""
    if int(divisor) < 1:
        raise ConfigError(f"CNN width divisor {divisor} must be a positive integer (1 = the "
                          "published widths)")
    return tuple(w if w == POOL else max(int(w) // int(divisor), 1) for w in widths)


def vgg16_teacher(dtype: Any = jnp.float32, width_divisor: int = 1) -> VGG:
    """torchvision's VGG16 features: biases, no batch norm (the METHOD.md VGG teacher)."""
    return VGG(narrowed(VGG16_WIDTHS, width_divisor), batch_norm=False, use_bias=True,
               dtype=dtype)


def mkdad_cloner(size: str = "equal", dtype: Any = jnp.float32, width_divisor: int = 1) -> VGG:
    """MKDAD's cloner (the METHOD.md VGG student): no biases, batch norm, ``equal``/``small``."""
    if size not in CLONER_WIDTHS:
        raise ConfigError(
            f"unknown cloner size {size!r}: use one of {', '.join(map(repr, CLONER_WIDTHS))}"
        )
    return VGG(narrowed(CLONER_WIDTHS[size], width_divisor), batch_norm=True, use_bias=False,
               dtype=dtype)
