"""The ISNet variant of DenseNet-BC.

Module names follow the original ISNet code, so its state dicts load unchanged:
``features.{conv0,norm0,relu0,pool0,special}``, ``features.denseblockB.denselayerL.
{norm1,relu1,conv1,norm2,relu2,conv2}``, ``features.transitionT.{norm,relu,conv,relu2,pool}``,
``features.{norm5,fReLU,AdaptPool}`` and ``classifier``. It differs from torchvision's
DenseNet in ways the relevance pass relies on: no in-place ReLU, a ReLU after each
transition's conv, a max pool returning indices, and the final ReLU and pooling as modules.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DenseNet",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "convert_torchvision_state_dict",
]


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, features):
        if isinstance(features, torch.Tensor):
            features = [features]
        out = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module("denselayer%d" % (i + 1), layer)

    def forward(self, init_features):
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int):
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(num_input_features))
        self.add_module("relu", nn.ReLU(inplace=False))
        self.add_module("conv", nn.Conv2d(num_input_features, num_output_features, kernel_size=1, bias=False))
        self.add_module("relu2", nn.ReLU(inplace=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class IgnoreIndexes(nn.Module):
    """Passes on the values of a max pool that returns ``(values, indices)``."""

    def forward(self, x):
        return x[0]


class DenseNet(nn.Module):
    """DenseNet-BC in the layout ISNet's relevance pass expects.

    Args:
        growth_rate: channels each dense layer adds (``k`` in the paper).
        block_config: number of layers in each dense block.
        num_init_features: channels of the stem convolution.
        bn_size: bottleneck width factor (``bn_size * growth_rate`` channels).
        drop_rate: dropout after each dense layer.
        num_classes: number of logits.
    """

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0,
                 num_classes: int = 1000):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=False)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1, return_indices=True)),
            ("special", IgnoreIndexes()),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate)
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module("transition%d" % (i + 1), _Transition(num_features, num_features // 2))
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.features.add_module("fReLU", nn.ReLU(inplace=False))
        self.features.add_module("AdaptPool", nn.AdaptiveAvgPool2d((1, 1)))
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Loads our, the original ISNet's, or torchvision's DenseNet weights (old ``norm.1`` keys too)."""
        return super().load_state_dict(
            convert_torchvision_state_dict(state_dict, dropout_classifier=isinstance(self.classifier, nn.Sequential)),
            strict=strict, assign=assign)


# torchvision's first DenseNet checkpoints name dense-layer modules 'norm.1', 'conv.2', ...
_OLD_DENSELAYER_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def convert_torchvision_state_dict(state_dict: Mapping[str, torch.Tensor],
                                   dropout_classifier: bool = False) -> "OrderedDict[str, torch.Tensor]":
    """Renames torchvision DenseNet keys (old ``norm.1``-style ones included) to ours.

    With ``dropout_classifier`` the classifier keys go to ``classifier.1.*``, the Linear of
    ``Sequential(Dropout, Linear)``; without it ``classifier.1.*`` keys go back to ``classifier.*``.
    """
    converted = OrderedDict()
    for key, value in state_dict.items():
        match = _OLD_DENSELAYER_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        if dropout_classifier and key in ("classifier.weight", "classifier.bias"):
            key = "classifier.1." + key.split(".")[-1]
        elif not dropout_classifier and key in ("classifier.1.weight", "classifier.1.bias"):
            key = "classifier." + key.split(".")[-1]
        converted[key] = value
    return converted


def _densenet(growth_rate, block_config, num_init_features, num_classes, dropout, **kwargs):
    model = DenseNet(growth_rate, block_config, num_init_features, num_classes=num_classes, **kwargs)
    if dropout is not None:
        model.classifier = nn.Sequential(nn.Dropout(p=dropout), model.classifier)
    return model


def densenet121(num_classes: int = 1000, dropout: Optional[float] = None, **kwargs) -> DenseNet:
    """DenseNet-121; ``dropout=p`` makes the classifier ``Sequential(Dropout(p), Linear)``."""
    return _densenet(32, (6, 12, 24, 16), 64, num_classes, dropout, **kwargs)


def densenet161(num_classes: int = 1000, dropout: Optional[float] = None, **kwargs) -> DenseNet:
    """DenseNet-161; ``dropout=p`` makes the classifier ``Sequential(Dropout(p), Linear)``."""
    return _densenet(48, (6, 12, 36, 24), 96, num_classes, dropout, **kwargs)


def densenet169(num_classes: int = 1000, dropout: Optional[float] = None, **kwargs) -> DenseNet:
    """DenseNet-169; ``dropout=p`` makes the classifier ``Sequential(Dropout(p), Linear)``."""
    return _densenet(32, (6, 12, 32, 32), 64, num_classes, dropout, **kwargs)


def densenet201(num_classes: int = 1000, dropout: Optional[float] = None, **kwargs) -> DenseNet:
    """DenseNet-201; ``dropout=p`` makes the classifier ``Sequential(Dropout(p), Linear)``."""
    return _densenet(32, (6, 12, 48, 32), 64, num_classes, dropout, **kwargs)
