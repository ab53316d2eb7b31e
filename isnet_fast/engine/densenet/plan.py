"""Reads a DenseNet into the plan the relevance pass follows, and checks it.

The plan names, for every channel range of a dense block's concatenated features, which
consumers' relevances flow back into it and through which BatchNorm fold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from .. import UnsupportedModelError
from ..stem import check_stem_pool


@dataclass
class DenseLayerPlan:
    name: str
    module: nn.Module
    in_channels: int  # channels of the concatenation this layer reads
    out_start: int  # where its new features sit in the block's concatenation
    out_stop: int


@dataclass
class DenseBlockPlan:
    name: str
    module: nn.Module
    in_channels: int
    out_channels: int
    layers: List[DenseLayerPlan]
    post_norm: nn.BatchNorm2d  # the next transition's norm, or norm5
    transition: Optional[nn.Module]  # the transition after this block, None for the last
    # consumers[m]: (producer, BatchNorm) pairs fed by layer m's relevance; producer 0 is the
    # block input, producer l the features of layer l (both 1-based like the layer names).
    consumers: Dict[int, List[Tuple[int, nn.BatchNorm2d]]] = field(default_factory=dict)

    def producer_slice(self, producer: int) -> slice:
        if producer == 0:
            return slice(0, self.in_channels)
        layer = self.layers[producer - 1]
        return slice(layer.out_start, layer.out_stop)


@dataclass
class DenseNetPlan:
    features: nn.Module
    classifier_pre: Optional[nn.Module]  # modules before the Linear (the dropout), or None
    classifier: nn.Linear
    blocks: List[DenseBlockPlan]


def _child(parent: nn.Module, name: str, where: str) -> nn.Module:
    module = getattr(parent, name, None) if name in dict(parent.named_children()) else None
    if module is None:
        raise UnsupportedModelError(
            f"the model has no module '{where}{name}', which the relevance pass needs; "
            "IsDenseFast takes an isnet_fast.DenseNet (or a model with the original ISNet DenseNet's layout)")
    return module


# What the relevance pass's rules need at each kind of position, for the error messages.
_BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)  # SyncBatchNorm folds alike (see the README on DDP)
_NEEDS = {
    nn.ReLU: "an nn.ReLU",
    _BATCHNORMS: "an nn.BatchNorm2d",
    nn.Conv2d: "an nn.Conv2d",
    nn.MaxPool2d: "an nn.MaxPool2d",
    nn.AvgPool2d: "an nn.AvgPool2d(kernel_size=2, stride=2)",
    nn.AdaptiveAvgPool2d: "an nn.AdaptiveAvgPool2d((1, 1))",
    nn.Linear: "an nn.Linear (or a Sequential ending with one)",
}


def _expect(module: nn.Module, kind, where: str):
    if not isinstance(module, kind):
        raise UnsupportedModelError(
            f"'{where}' is {_describe(module)}, but the relevance pass's rules need {_NEEDS[kind]} there "
            "(with another module the heatmaps would be wrong)")


def _describe(module) -> str:
    """'a LeakyReLU(negative_slope=0.01)': the module's one-line repr, or its type's name."""
    text = repr(module) if isinstance(module, nn.Module) and not list(module.children()) else ""
    if not text or len(text) > 60 or "\n" in text:
        text = type(module).__name__
    return f"an {text}" if text[:1].lower() in "aeiou" else f"a {text}"


def _child_as(parent: nn.Module, name: str, where: str, kind) -> nn.Module:
    """The child ``name`` of ``parent`` (``where`` is the parent's dotted prefix), checked to be a ``kind``."""
    module = _child(parent, name, where)
    _expect(module, kind, where + name)
    return module


def _layer_number(name: str) -> int:
    return int(name[len("denselayer"):])


def consumer_pairs(layer_names: List[str], reference_pairing: bool) -> Dict[int, List[Tuple[int, int]]]:
    """For each layer m of a block (1-based), the (producer, BatchNorm's layer) pairs its relevance feeds.

    The block input (producer 0) takes every layer's relevance through that layer's norm1. A
    layer l takes the relevance of every later layer m through m's norm1. With
    ``reference_pairing`` the pairing is the original's, which picks the later layers by the
    last digit of their names ("denselayer12" counts as 2) and then pairs them, in descending
    order, with the relevances of the last layers: in blocks of ten or more layers it drops
    and misaligns consumers. The reference fixtures were made with it.
    """
    n = len(layer_names)
    pairs: Dict[int, List[Tuple[int, int]]] = {m: [(0, m)] for m in range(1, n + 1)}
    for producer in range(1, n + 1):
        later = list(range(n, producer, -1))
        if reference_pairing:
            later = [m for m in later if int(layer_names[m - 1][-1]) > producer]
        for i, norm_layer in enumerate(later):
            pairs[n - i].append((producer, norm_layer))
    return pairs


def build_plan(model: nn.Module, reference_pairing: bool = True) -> DenseNetPlan:
    """Reads the DenseNet's structure, raising UnsupportedModelError where it cannot be used.

    Every module the pass reads is checked for the type its rules assume (ReLUs, BatchNorm2ds,
    Conv2ds, the pools), before any of its attributes is read.
    """
    if not isinstance(model, nn.Module):
        what = f"the class {model.__name__}" if isinstance(model, type) else f"a {type(model).__name__}"
        raise TypeError(f"IsDenseFast takes a DenseNet module, e.g. densenet121(num_classes=3), got {what}"
                        + (" (call it to build the network)" if callable(model) else ""))
    _refuse_torchvision_densenet(model)
    features = _child(model, "features", "")
    f = "features."
    for name, kind in (("conv0", nn.Conv2d), ("norm0", _BATCHNORMS), ("relu0", nn.ReLU), ("pool0", nn.MaxPool2d),
                       ("norm5", _BATCHNORMS), ("fReLU", nn.ReLU), ("AdaptPool", nn.AdaptiveAvgPool2d)):
        _child_as(features, name, f, kind)
    check_stem_pool(features.pool0, "features.pool0")
    if tuple(nn.modules.utils._pair(features.AdaptPool.output_size)) != (1, 1):
        raise UnsupportedModelError("features.AdaptPool must pool to 1x1, as in the DenseNet")

    classifier = _child(model, "classifier", "")
    classifier_pre = None
    if isinstance(classifier, nn.Sequential):
        if len(classifier) == 0 or not isinstance(classifier[-1], nn.Linear):
            raise UnsupportedModelError("a Sequential classifier must end with a Linear, e.g. Sequential(Dropout, Linear)")
        classifier_pre = classifier[:-1]
        classifier = classifier[-1]
    _expect(classifier, nn.Linear, "classifier")

    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU) and module.inplace:
            raise UnsupportedModelError(
                f"'{name}' is an in-place ReLU: the relevance pass reads the activations it would "
                "overwrite. Build it with nn.ReLU(inplace=False)")
        if isinstance(module, _BATCHNORMS) and (not module.affine or not module.track_running_stats):
            raise UnsupportedModelError(f"'{name}' must be an affine BatchNorm2d with running statistics")
        if isinstance(module, nn.Conv2d):
            if module.bias is not None:
                raise UnsupportedModelError(f"'{name}' has a bias; the DenseNet's convolutions have none")
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                padding = module.padding_mode if module.padding_mode != "zeros" else f"padding={module.padding!r}"
                raise UnsupportedModelError(
                    f"'{name}' pads with {padding}; the relevance pass's transposed convolution needs zero "
                    "padding given as numbers, e.g. nn.Conv2d(..., padding=1)")

    block_names = sorted((n for n, _ in features.named_children() if n.startswith("denseblock")),
                         key=lambda n: _block_number(n))
    if not block_names:
        raise UnsupportedModelError("the model has no 'features.denseblock1'")
    blocks = []
    channels = features.norm0.num_features
    for b, block_name in enumerate(block_names, start=1):
        if block_name != f"denseblock{b}":
            raise UnsupportedModelError(f"dense blocks must be numbered 1, 2, ...; found 'features.{block_name}'")
        block = getattr(features, block_name)
        layer_names = [n for n, _ in block.named_children()]
        if not layer_names or any(n != f"denselayer{i}" for i, n in enumerate(layer_names, start=1)):
            raise UnsupportedModelError(f"features.{block_name} must hold denselayer1, denselayer2, ...")
        layers = []
        start = channels
        for layer_name in layer_names:
            layer = getattr(block, layer_name)
            where = f"features.{block_name}.{layer_name}."
            for part, kind in (("norm1", _BATCHNORMS), ("relu1", nn.ReLU), ("conv1", nn.Conv2d),
                               ("norm2", _BATCHNORMS), ("relu2", nn.ReLU), ("conv2", nn.Conv2d)):
                _child_as(layer, part, where, kind)
            growth = layer.conv2.out_channels
            if layer.norm1.num_features != start:
                raise UnsupportedModelError(f"{where}norm1 has {layer.norm1.num_features} channels, expected {start}")
            layers.append(DenseLayerPlan(layer_name, layer, start, start, start + growth))
            start += growth
        transition = None
        if b < len(block_names):
            transition = _child(features, f"transition{b}", f)
            where = f"features.transition{b}."
            for part, kind in (("norm", _BATCHNORMS), ("relu", nn.ReLU), ("conv", nn.Conv2d), ("relu2", nn.ReLU),
                               ("pool", nn.AvgPool2d)):
                _child_as(transition, part, where, kind)
            pool = transition.pool
            if nn.modules.utils._pair(pool.kernel_size) != (2, 2) or nn.modules.utils._pair(pool.stride) != (2, 2) \
                    or nn.modules.utils._pair(pool.padding) != (0, 0) or pool.ceil_mode:
                raise UnsupportedModelError(f"features.transition{b}.pool must be AvgPool2d(kernel_size=2, stride=2)")
            post_norm = transition.norm
        else:
            post_norm = features.norm5
        plan = DenseBlockPlan(block_name, block, channels, start, layers, post_norm, transition)
        for m, pairs in consumer_pairs(layer_names, reference_pairing).items():
            plan.consumers[m] = [(producer, layers[norm_layer - 1].module.norm1) for producer, norm_layer in pairs]
        blocks.append(plan)
        channels = transition.conv.out_channels if transition is not None else start
    return DenseNetPlan(features, classifier_pre, classifier, blocks)


# torchvision's DenseNets by (growth rate, layers per block, initial features), for the message below.
_TORCHVISION_ARCHITECTURES = {
    (32, (6, 12, 24, 16), 64): "densenet121",
    (48, (6, 12, 36, 24), 96): "densenet161",
    (32, (6, 12, 32, 32), 64): "densenet169",
    (32, (6, 12, 48, 32), 64): "densenet201",
}


def _refuse_torchvision_densenet(model: nn.Module) -> None:
    """Refuses torchvision's DenseNet (or a copy of its layout) saying how to load its weights into ours."""
    features = getattr(model, "features", None)
    children = dict(features.named_children()) if isinstance(features, nn.Module) else {}
    from_torchvision = type(model).__module__.split(".")[0] == "torchvision" and "DenseNet" in type(model).__name__
    its_layout = "denseblock1" in children and "norm5" in children and "fReLU" not in children
    if not (from_torchvision or its_layout):
        return
    try:  # the matching constructor of ours, with the classifier's outputs
        blocks = [block for name, block in children.items() if name.startswith("denseblock")]
        shape = (blocks[0].denselayer1.conv2.out_channels, tuple(len(list(b.children())) for b in blocks),
                 children["conv0"].out_channels)
        classifier = model.classifier[-1] if isinstance(model.classifier, nn.Sequential) else model.classifier
        classes = classifier.out_features
        name = _TORCHVISION_ARCHITECTURES.get(shape)
        build = (f"isnet_fast.{name}(num_classes={classes})" if name else
                 f"isnet_fast.DenseNet(growth_rate={shape[0]}, block_config={shape[1]}, "
                 f"num_init_features={shape[2]}, num_classes={classes})")
    except (AttributeError, IndexError, KeyError, TypeError):
        build = "isnet_fast.densenet121(num_classes=...)"
    what = "torchvision's DenseNet" if from_torchvision else "a DenseNet in torchvision's layout"
    raise UnsupportedModelError(
        f"IsDenseFast cannot take {what} (in-place ReLUs, no features.fReLU); load its weights into ours: "
        f"net = {build}; net.load_state_dict(tv_model.state_dict()) (the keys are converted), then "
        "IsDenseFast(net)")


def _block_number(name: str) -> int:
    """3 for 'denseblock3'; -1 for a name that does not end in a number (reported as misnumbered)."""
    suffix = name[len("denseblock"):]
    return int(suffix) if suffix.isdigit() else -1
