"""torchvision's ResNet, with non-in-place ReLUs, for the ISNet ResNet (``IsResNetFast``).

The layout, module names and state-dict keys are torchvision's exactly (``conv1``, ``bn1``,
``relu``, ``maxpool``, ``layer1..4`` of ``BasicBlock``/``Bottleneck`` blocks with ``conv1``,
``bn1``, ..., ``downsample.0``/``downsample.1`` where the shape changes, ``avgpool``, ``fc``), so
torchvision's ResNet weights load without torchvision. The one difference: every ReLU is built
with ``inplace=False``, because the relevance pass reads the tensors an in-place ReLU would
overwrite (the batch-normalised branch output and the residual sum before their ReLUs).
"""

from __future__ import annotations

from typing import Optional, Sequence, Type, Union

import torch
import torch.nn as nn

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; the first strides."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 base_width: int = 64):
        super().__init__()
        if base_width != 64:
            raise ValueError(f"BasicBlock supports only width_per_group=64, got {base_width}")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)  # one module for both ReLUs, as torchvision; never in place
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1, 3x3 (which strides, torchvision's "ResNet v1.5") and 1x1 convolutions, 4x wider out."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 base_width: int = 64):
        super().__init__()
        width = int(planes * (base_width / 64.0))
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """torchvision's ResNet layout with non-in-place ReLUs.

    ``block``: "basic" (ResNet-18/34) or "bottleneck" (ResNet-50/101/152), or the block class;
    ``layers``: blocks per stage; ``stem_width``: conv1's output channels; ``widths``: each
    stage's ``planes`` (a bottleneck stage outputs 4x that); ``width_per_group``: the bottleneck's
    inner width factor (128 for torchvision's wide_resnet50_2); ``dropout``: when given, ``fc`` is
    ``Sequential(Dropout(dropout), Linear)`` (keys ``fc.1.*``). Stages after the first stride 2.
    Initialised as torchvision does (Kaiming-normal convolutions, BatchNorms at 1 and 0).
    """

    def __init__(self, block: Union[str, Type[nn.Module]], layers: Sequence[int], num_classes: int = 1000,
                 stem_width: int = 64, widths: Sequence[int] = (64, 128, 256, 512), width_per_group: int = 64,
                 dropout: Optional[float] = None):
        super().__init__()
        if isinstance(block, str):
            if block not in BLOCKS:
                raise ValueError(f"block must be one of {tuple(BLOCKS)}, got {block!r}")
            block = BLOCKS[block]
        layers, widths = tuple(layers), tuple(widths)
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"layers and widths need one entry per stage, got layers={layers}, widths={widths}")
        if any(int(n) < 1 for n in layers):
            raise ValueError(f"every stage needs at least one block, got layers={layers}")
        self.conv1 = nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inplanes = stem_width
        self.base_width = width_per_group
        for index, (planes, count) in enumerate(zip(widths, layers), start=1):
            stage = self._make_layer(block, planes, int(count), stride=1 if index == 1 else 2)
            self.add_module(f"layer{index}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        linear = nn.Linear(widths[-1] * block.expansion, num_classes)
        self.fc = linear if dropout is None else nn.Sequential(nn.Dropout(p=dropout), linear)
        self.num_stages = len(layers)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        stage = [block(self.inplanes, planes, stride, downsample, base_width=self.base_width)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes, base_width=self.base_width) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{index}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, dropout: Optional[float] = None) -> ResNet:
    return ResNet("basic", (2, 2, 2, 2), num_classes, dropout=dropout)


def resnet34(num_classes: int = 1000, dropout: Optional[float] = None) -> ResNet:
    return ResNet("basic", (3, 4, 6, 3), num_classes, dropout=dropout)


def resnet50(num_classes: int = 1000, dropout: Optional[float] = None) -> ResNet:
    return ResNet("bottleneck", (3, 4, 6, 3), num_classes, dropout=dropout)


def resnet101(num_classes: int = 1000, dropout: Optional[float] = None) -> ResNet:
    return ResNet("bottleneck", (3, 4, 23, 3), num_classes, dropout=dropout)


def resnet152(num_classes: int = 1000, dropout: Optional[float] = None) -> ResNet:
    return ResNet("bottleneck", (3, 8, 36, 3), num_classes, dropout=dropout)
