"""Plain ``torch.nn`` VGG16 and ResNet18 with torchvision's module names and state-dict keys.

torchvision cannot be installed here (its wheels need a CUDA torch), so these rebuild
``torchvision.models.vgg16()`` and ``resnet18()`` from their documented architectures; the tests
pin torchvision's parameter counts. ``randomise`` gives every weight and batch-norm statistic a
non-trivial value, and ``taps`` records the intermediate outputs with forward hooks.
Not a test module: imported by the test modules that need it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

VGG16_PARAMETERS = 138_357_544  # torchvision.models.vgg16()
RESNET18_PARAMETERS = 11_689_512  # torchvision.models.resnet18()
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M"]


class VGG16(nn.Module):
    """torchvision ``VGG(make_layers(cfgs["D"]))``: ``features``, ``avgpool``, ``classifier``."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in VGG16_CFG:
            if width == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1),
                           nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision ``ResNet(BasicBlock, [2, 2, 2, 2])``."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for stage, planes in enumerate((64, 128, 256, 512), start=1):
            stride = 1 if stage == 1 else 2
            blocks = [BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)]
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def count_parameters(model: nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


@torch.no_grad()
def randomise(model: nn.Module, seed: int) -> nn.Module:
    """He-scaled conv/linear weights, non-zero biases, batch-norm affine and running statistics
    away from their defaults, so that a wrong mapping of any tensor changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    normal = lambda t: torch.randn(t.shape, generator=generator)
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            module.weight.copy_(normal(module.weight) * (2 / module.weight[0].numel()) ** 0.5)
            if module.bias is not None:
                module.bias.copy_(0.1 * normal(module.bias))
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.copy_(1 + 0.3 * normal(module.weight))
            module.bias.copy_(0.3 * normal(module.bias))
            module.running_mean.copy_(0.3 * normal(module.running_mean))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape,
                                                      generator=generator))
    return model.eval()


def tap_modules(model: nn.Module) -> list[nn.Module]:
    """VGG16: the 13 ReLUs of ``features``; ResNet18: ``layer1..layer4``."""
    if isinstance(model, VGG16):
        return [m for m in model.features if isinstance(m, nn.ReLU)]
    return [getattr(model, f"layer{stage}") for stage in range(1, 5)]


@torch.no_grad()
def taps(model: nn.Module, images_nhwc: np.ndarray) -> list[np.ndarray]:
    """The outputs of :func:`tap_modules` on NHWC float32 images, as NHWC arrays (forward hooks)."""
    outputs: list[np.ndarray] = []
    hook = lambda module, inputs, output: outputs.append(
        output.detach().permute(0, 2, 3, 1).numpy().copy())
    handles = [module.register_forward_hook(hook) for module in tap_modules(model)]
    try:
        model(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))))
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def state_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The state dict as numpy arrays (what ``safetensors.numpy.save_file`` takes)."""
    return {key: value.detach().numpy().copy() for key, value in model.state_dict().items()}
