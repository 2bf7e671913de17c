"""ResNet18 (He et al., CVPR 2016) in torchvision's layout, returning the output of each stage.

METHOD.md "The paper's ablations": teacher and student are both this network. The teacher runs
with ``train=False`` (batch norm on its frozen running statistics); the student starts from a
random init (torchvision's: Kaiming-normal fan-out convs, batch norm scale 1 bias 0) and trains
with ``train=True``: batch norm then normalises with the batch's statistics and updates the running
ones in the ``batch_stats`` collection (``apply(..., train=True, mutable=["batch_stats"])``), which
lives in the train state.

``apply`` returns ``{"taps": (layer1, layer2, layer3, layer4)}``, NHWC: strides 4, 8, 16, 32 and
64, 128, 256, 512 channels. The classifier (``avgpool``, ``fc``) is not part of the model.
Module names follow torchvision's state-dict keys: ``conv1``, ``bn1``, ``layer{i}_{j}`` for
``layer{i}.{j}``, and inside a block ``conv1, bn1, conv2, bn2, downsample_0, downsample_1``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcd_jax.models.vgg import batch_norm

STAGE_WIDTHS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = (2, 2, 2, 2)  # ResNet18
TAP_NAMES = tuple(f"layer{stage}" for stage in range(1, len(STAGE_WIDTHS) + 1))

# torchvision's init: kaiming_normal_(mode="fan_out", nonlinearity="relu"), untruncated.
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, size: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    """torch ``Conv2d(kernel_size=size, stride=stride, padding=size // 2, bias=False)``."""
    pad = size // 2
    return nn.Conv(
        features, (size, size), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        use_bias=False, kernel_init=KAIMING_FAN_OUT, dtype=dtype, name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm and an identity (or 1x1-conv) shortcut."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs: jax.Array, train: bool) -> jax.Array:
        hidden = conv(self.features, 3, self.stride, self.dtype, "conv1")(inputs)
        hidden = nn.relu(batch_norm(train, self.dtype, "bn1")(hidden))
        hidden = conv(self.features, 3, 1, self.dtype, "conv2")(hidden)
        hidden = batch_norm(train, self.dtype, "bn2")(hidden)
        shortcut = inputs
        if self.stride != 1 or inputs.shape[-1] != self.features:
            shortcut = conv(self.features, 1, self.stride, self.dtype, "downsample_0")(inputs)
            shortcut = batch_norm(train, self.dtype, "downsample_1")(shortcut)
        return nn.relu(hidden + shortcut)


class ResNet18(nn.Module):
    """ResNet18 without its classifier; input NHWC images, already normalised. ``stage_widths``
    other than torchvision's (64, 128, 256, 512) only for tiny random networks (tests, demos)."""

    dtype: Any = jnp.float32
    stage_widths: tuple[int, ...] = STAGE_WIDTHS

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, tuple[jax.Array, ...]]:
        stem = conv(self.stage_widths[0], 7, 2, self.dtype, "conv1")
        features = stem(images.astype(self.dtype))
        features = nn.relu(batch_norm(train, self.dtype, "bn1")(features))
        features = nn.max_pool(features, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        taps = []
        stages = zip(self.stage_widths, BLOCKS_PER_STAGE, strict=True)
        for stage, (width, blocks) in enumerate(stages):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                features = BasicBlock(
                    width, stride, self.dtype, name=f"layer{stage + 1}_{block}"
                )(features, train)
            taps.append(features)
        return {"taps": tuple(taps)}
