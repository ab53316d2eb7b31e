"""Reads a ResNet (torchvision's layout) into the plan the ResNet relevance pass follows, and checks it.

The layout: ``conv1``, ``bn1``, ``relu``, ``maxpool``, stages ``layer1..layerN`` of residual
blocks, ``avgpool`` (to 1x1) and ``fc`` (a Linear, or a Sequential ending with one). A block is
torchvision's ``BasicBlock`` (``conv1, bn1, conv2, bn2``) or ``Bottleneck`` (``conv1..3,
bn1..3``), with ``downsample = Sequential(Conv2d, BatchNorm2d)`` where the shape changes, and
either one ``relu`` module (torchvision's) or one per position (``relu1, relu2[, relu3]``, the
authors' ``resnet.py``); the last ReLU follows the residual sum. Anything else is refused with an
UnsupportedModelError naming the module: the pass would otherwise skip it and give wrong maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch.nn as nn

from .. import UnsupportedModelError
from ..stem import check_stem_pool

_BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
_KINDS = {2: "basic", 3: "bottleneck"}  # by the number of BatchNorm-folded convs in the branch


@dataclass
class ConvBatchNorm:
    """A convolution and the BatchNorm right after it: one folded linear map."""
    name: str  # the conv's dotted name, for messages
    conv: nn.Conv2d
    bn: nn.BatchNorm2d


@dataclass
class ResidualBlockPlan:
    name: str  # "layer2.0"
    module: nn.Module
    kind: str  # "basic" or "bottleneck"
    convs: List[ConvBatchNorm]  # the branch, in forward order
    relus: List[nn.ReLU]  # after each branch BatchNorm but the last, then the post-sum ReLU
    downsample: Optional[ConvBatchNorm]  # None: an identity shortcut
    in_channels: int
    out_channels: int


@dataclass
class ResNetPlan:
    model: nn.Module
    stem: ConvBatchNorm  # conv1, bn1
    stem_relu: nn.ReLU
    maxpool: nn.MaxPool2d
    stages: List[List[ResidualBlockPlan]]
    avgpool: nn.AdaptiveAvgPool2d
    classifier_pre: Optional[nn.Module]  # the modules of a Sequential fc before its Linear (dropout)
    classifier: nn.Linear

    @property
    def blocks(self) -> List[ResidualBlockPlan]:
        return [block for stage in self.stages for block in stage]


def _describe(module) -> str:
    text = repr(module) if isinstance(module, nn.Module) and not list(module.children()) else ""
    if not text or len(text) > 60 or "\n" in text:
        text = type(module).__name__
    return f"an {text}" if text[:1].lower() in "aeiou" else f"a {text}"


def _child(parent: nn.Module, name: str, where: str, kind, needs: str) -> nn.Module:
    """The child ``name`` of ``parent`` (``where``: the parent's dotted prefix), checked to be a ``kind``."""
    module = dict(parent.named_children()).get(name)
    if module is None:
        raise UnsupportedModelError(f"the model has no module '{where}{name}', which the relevance pass needs; "
                                    "IsResNetFast takes a ResNet in torchvision's layout (isnet_fast.resnet50(...))")
    if not isinstance(module, kind):
        raise UnsupportedModelError(f"'{where}{name}' is {_describe(module)}, but the relevance pass needs {needs} "
                                    "there (with another module the heatmaps would be wrong)")
    return module


def _check_modules(model: nn.Module) -> None:
    """Every module the rules assume something of: ReLUs not in place, BatchNorms affine with
    running statistics, convolutions without bias and with numeric zero padding."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU) and module.inplace:
            raise UnsupportedModelError(
                f"'{name}' is an in-place ReLU: the relevance pass reads the activations it would overwrite. "
                "Build it with nn.ReLU(inplace=False), or set its .inplace = False; isnet_fast.resnet18..152 "
                "build the same network without them and load torchvision's state dicts as they are")
        if isinstance(module, _BATCHNORMS) and (not module.affine or not module.track_running_stats):
            raise UnsupportedModelError(f"'{name}' must be an affine BatchNorm2d with running statistics")
        if isinstance(module, nn.Conv2d):
            if module.bias is not None:
                raise UnsupportedModelError(f"'{name}' has a bias; the ResNet's convolutions have none "
                                            "(the BatchNorm after each one provides the shift)")
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                padding = module.padding_mode if module.padding_mode != "zeros" else f"padding={module.padding!r}"
                raise UnsupportedModelError(
                    f"'{name}' pads with {padding}; the relevance pass's transposed convolution needs zero "
                    "padding given as numbers, e.g. nn.Conv2d(..., padding=1)")


_BLOCK_NEEDS = ("a residual block in torchvision's layout: a BasicBlock (conv1, bn1, conv2, bn2) or a "
                "Bottleneck (conv1, bn1, conv2, bn2, conv3, bn3), ReLUs 'relu' or 'relu1', 'relu2', ..., and "
                "an optional downsample")


def _read_block(block: nn.Module, name: str, in_channels: int) -> ResidualBlockPlan:
    where = name + "."
    children = dict(block.named_children())
    if "conv1" not in children:
        raise UnsupportedModelError(f"'{name}' is {_describe(block)}, not a residual block; the relevance pass needs "
                                    f"{_BLOCK_NEEDS}")
    count = 3 if "conv3" in children else 2
    kind = _KINDS[count]
    expected = {f"{part}{k}" for part in ("conv", "bn") for k in range(1, count + 1)}
    per_position = {f"relu{k}" for k in range(1, count + 1)}
    allowed = expected | per_position | {"relu", "downsample"}
    unknown = [child for child in children if child not in allowed]
    if unknown:
        raise UnsupportedModelError(f"'{name}' ({type(block).__name__}) holds '{where}{unknown[0]}', which the "
                                    f"relevance pass does not know; it needs {_BLOCK_NEEDS}")
    # A pre-activation block (BatchNorm and ReLU before each conv) has the same names in another order.
    order = [child for child in children if child in expected]
    if order != [f"{part}{k}" for k in range(1, count + 1) for part in ("conv", "bn")] and \
            set(order) == expected:
        raise UnsupportedModelError(f"'{name}' registers its modules in the order {', '.join(order)}; the "
                                    f"relevance pass needs each conv followed by its BatchNorm ({_BLOCK_NEEDS})")
    convs = []
    channels = in_channels
    for k in range(1, count + 1):
        conv = _child(block, f"conv{k}", where, nn.Conv2d, "an nn.Conv2d")
        bn = _child(block, f"bn{k}", where, _BATCHNORMS, "an nn.BatchNorm2d")
        if conv.in_channels != channels:
            raise UnsupportedModelError(f"'{where}conv{k}' takes {conv.in_channels} channels, but its input has "
                                        f"{channels}")
        if bn.num_features != conv.out_channels:
            raise UnsupportedModelError(f"'{where}bn{k}' normalises {bn.num_features} channels, but '{where}conv{k}' "
                                        f"makes {conv.out_channels}")
        convs.append(ConvBatchNorm(f"{where}conv{k}", conv, bn))
        channels = conv.out_channels
    if per_position & set(children):
        relus = [_child(block, f"relu{k}", where, nn.ReLU, "an nn.ReLU") for k in range(1, count + 1)]
    else:
        relus = [_child(block, "relu", where, nn.ReLU, "an nn.ReLU")] * count
    out_channels = channels
    strided = any(tuple(nn.modules.utils._pair(unit.conv.stride)) != (1, 1) for unit in convs)
    downsample = None
    if "downsample" in children:
        sequence = children["downsample"]
        if not isinstance(sequence, nn.Sequential) or len(sequence) != 2 or \
                not isinstance(sequence[0], nn.Conv2d) or not isinstance(sequence[1], _BATCHNORMS):
            raise UnsupportedModelError(f"'{where}downsample' is {_describe(sequence)}; the relevance pass needs "
                                        "Sequential(Conv2d, BatchNorm2d) there, as torchvision builds it")
        conv, bn = sequence[0], sequence[1]
        if conv.in_channels != in_channels or conv.out_channels != out_channels or bn.num_features != out_channels:
            raise UnsupportedModelError(f"'{where}downsample' maps {conv.in_channels} to {conv.out_channels} channels "
                                        f"(BatchNorm of {bn.num_features}); the block maps {in_channels} to "
                                        f"{out_channels}")
        downsample = ConvBatchNorm(f"{where}downsample.0", conv, bn)
    elif strided or in_channels != out_channels:
        raise UnsupportedModelError(f"'{name}' changes the shape ({in_channels} to {out_channels} channels"
                                    f"{', strided' if strided else ''}) but has no downsample; the shortcut needs "
                                    "a downsample = Sequential(Conv2d, BatchNorm2d)")
    return ResidualBlockPlan(name, block, kind, convs, relus, downsample, in_channels, out_channels)


def build_resnet_plan(model: nn.Module) -> ResNetPlan:
    """Reads the ResNet's structure, raising UnsupportedModelError where it cannot be used."""
    if not isinstance(model, nn.Module):
        what = f"the class {model.__name__}" if isinstance(model, type) else f"a {type(model).__name__}"
        raise TypeError(f"IsResNetFast takes a ResNet module, e.g. isnet_fast.resnet18(num_classes=3), got {what}"
                        + (" (call it to build the network)" if callable(model) else ""))
    _check_modules(model)
    conv1 = _child(model, "conv1", "", nn.Conv2d, "an nn.Conv2d")
    bn1 = _child(model, "bn1", "", _BATCHNORMS, "an nn.BatchNorm2d")
    stem_relu = _child(model, "relu", "", nn.ReLU, "an nn.ReLU")
    maxpool = _child(model, "maxpool", "", nn.MaxPool2d, "an nn.MaxPool2d")
    check_stem_pool(maxpool, "maxpool")
    if bn1.num_features != conv1.out_channels:
        raise UnsupportedModelError(f"'bn1' normalises {bn1.num_features} channels, but 'conv1' makes "
                                    f"{conv1.out_channels}")

    stage_names = [name for name, _ in model.named_children() if name.startswith("layer")]
    if not stage_names:
        raise UnsupportedModelError("the model has no module 'layer1', which the relevance pass needs; IsResNetFast "
                                    "takes a ResNet in torchvision's layout (isnet_fast.resnet50(...))")
    if stage_names != [f"layer{k}" for k in range(1, len(stage_names) + 1)]:
        raise UnsupportedModelError(f"the stages must be layer1, layer2, ... in order; found {', '.join(stage_names)}")
    known = {"conv1", "bn1", "relu", "maxpool", "avgpool", "fc", *stage_names}
    for name, _ in model.named_children():
        if name not in known:
            raise UnsupportedModelError(f"'{name}' is not part of torchvision's ResNet layout; the relevance pass "
                                        "would skip it (and the heatmaps would be wrong)")
    stages = []
    channels = conv1.out_channels
    for stage_name in stage_names:
        stage = _child(model, stage_name, "", nn.Sequential, "an nn.Sequential of residual blocks")
        if len(stage) == 0:
            raise UnsupportedModelError(f"'{stage_name}' holds no blocks")
        blocks = []
        for index, block in stage.named_children():
            blocks.append(_read_block(block, f"{stage_name}.{index}", channels))
            channels = blocks[-1].out_channels
        stages.append(blocks)

    avgpool = _child(model, "avgpool", "", nn.AdaptiveAvgPool2d, "an nn.AdaptiveAvgPool2d((1, 1))")
    if tuple(nn.modules.utils._pair(avgpool.output_size)) != (1, 1):
        raise UnsupportedModelError("'avgpool' must pool to 1x1, as torchvision's ResNet")
    fc = dict(model.named_children()).get("fc")
    classifier_pre = None
    if isinstance(fc, nn.Sequential):
        if len(fc) == 0 or not isinstance(fc[-1], nn.Linear):
            raise UnsupportedModelError("a Sequential 'fc' must end with a Linear, e.g. Sequential(Dropout, Linear)")
        classifier_pre, fc = fc[:-1], fc[-1]
    classifier = fc if isinstance(fc, nn.Linear) else _child(model, "fc", "", nn.Linear, "an nn.Linear")
    if classifier.in_features != channels:
        raise UnsupportedModelError(f"'fc' takes {classifier.in_features} features, but the last stage makes "
                                    f"{channels} channels")
    return ResNetPlan(model, ConvBatchNorm("conv1", conv1, bn1), stem_relu, maxpool, stages, avgpool,
                      classifier_pre, classifier)
