"""The networks isnet-fast explains, in one place: DenseNets (``IsDenseFast``) and ResNets
(``IsResNetFast``), by name, as configuration dicts, and as a training checkpoint records them.

The DenseNet's configuration helpers (``densenet_config``, ``build_densenet``) stay in
``isnet_fast.training``, where they were first; the ResNet's are here. Everything that picks
between the two (training, the Lightning module, ``isnet-fast explain``) asks :func:`is_resnet`
and :func:`wrap_network`, so a third family would be added here only.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

import torch.nn as nn

from .models.densenet import DenseNet, densenet121, densenet161, densenet169, densenet201
from .model import IsDenseFast
from .models.resnet import BLOCKS, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from .resnet_model import IsResNetFast
from .engine.resnet.plan import build_resnet_plan
from .engine.densenet.plan import build_plan

__all__ = [
    "DENSENET_ARCHITECTURES",
    "ISNET_MODELS",
    "NAMED_ARCHITECTURES",
    "RESNET_ARCHITECTURES",
    "build_resnet",
    "classifier_outputs",
    "infer_resnet_config",
    "inner_network",
    "is_resnet",
    "known_resnet_name",
    "resnet_config",
    "wrap_network",
]

DENSENET_ARCHITECTURES = {"densenet121": densenet121, "densenet161": densenet161, "densenet169": densenet169,
                          "densenet201": densenet201}
RESNET_ARCHITECTURES = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet101": resnet101,
                        "resnet152": resnet152}
# name -> builder(num_classes=..., dropout=...)
NAMED_ARCHITECTURES = {**DENSENET_ARCHITECTURES, **RESNET_ARCHITECTURES}
ISNET_MODELS = (IsDenseFast, IsResNetFast)

# torchvision's ResNets as (block, layers); all have a 64-channel stem, widths 64-128-256-512 and
# width_per_group 64. Used to name the architecture a checkpoint's shapes fit.
_KNOWN_RESNETS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
                  "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3)),
                  "resnet152": ("bottleneck", (3, 8, 36, 3))}
_TORCHVISION_RESNET_SHAPE = (64, (64, 128, 256, 512), 64)  # stem_width, widths, width_per_group


def is_resnet(network: nn.Module) -> bool:
    """Whether ``network`` (a bare network or an ISNet model around one) is a ResNet in torchvision's
    layout; anything else is taken for a DenseNet, as IsDenseFast always took it."""
    if isinstance(network, (IsResNetFast, ResNet)):
        return True
    if isinstance(network, (IsDenseFast, DenseNet)):
        return False
    return isinstance(network, nn.Module) and hasattr(network, "layer1") and hasattr(network, "fc")


def inner_network(model: nn.Module) -> nn.Module:
    """The network an IsDenseFast or IsResNetFast wraps; any other module itself."""
    if isinstance(model, IsResNetFast):
        return model.resnet
    if isinstance(model, IsDenseFast):
        return model.DenseNet
    return model


def wrap_network(network: nn.Module, reference_pairing: Optional[bool] = None,
                 **settings: Any) -> Union[IsDenseFast, IsResNetFast]:
    """``IsResNetFast(network, **settings)`` for a ResNet, else ``IsDenseFast(network, ...)``.

    ``reference_pairing`` is the DenseNet's alone (the pairing of its dense blocks' consumers): a
    ResNet takes only None.
    """
    if is_resnet(network):
        if reference_pairing is not None:
            raise ValueError(f"reference_pairing={reference_pairing} chooses the consumers of a DenseNet's dense "
                             "blocks; a ResNet has none: leave it out (reference_quirks sets the ResNet's "
                             "max-pool un-pooling)")
        return IsResNetFast(network, **settings)
    return IsDenseFast(network, reference_pairing=reference_pairing, **settings)


def classifier_outputs(model: nn.Module) -> int:
    """The number of classes of an IsDenseFast or IsResNetFast (its classifier's outputs)."""
    if isinstance(model, IsResNetFast):
        return build_resnet_plan(model.resnet).classifier.out_features
    return build_plan(model.DenseNet, model.reference_pairing).classifier.out_features


def resnet_config(model: nn.Module) -> Dict[str, Any]:
    """The :class:`isnet_fast.ResNet` arguments that rebuild ``model`` (a ResNet, or an IsResNetFast
    around one), read from its layers, so ``resnet50()`` & co. describe themselves too.

    ``dropout`` is the p of a ``Sequential(Dropout, Linear)`` ``fc``, or None.
    """
    net = inner_network(model)
    if not is_resnet(net):
        raise TypeError(f"resnet_config takes a ResNet or an IsResNetFast, got a {type(net).__name__}")
    stages = [module for name, module in net.named_children() if name.startswith("layer")]
    first_blocks = [stage[0] for stage in stages]
    bottleneck = isinstance(first_blocks[0], Bottleneck) or hasattr(first_blocks[0], "conv3")
    if bottleneck:
        planes = [block.conv3.out_channels // Bottleneck.expansion for block in first_blocks]
        width_per_group = first_blocks[0].conv1.out_channels * 64 // planes[0]
    else:
        planes = [block.conv1.out_channels for block in first_blocks]
        width_per_group = 64
    fc = net.fc
    dropout = None
    if isinstance(fc, nn.Sequential):
        dropout = next((m.p for m in fc if isinstance(m, nn.Dropout)), None)
        fc = fc[-1]
    return {
        "block": "bottleneck" if bottleneck else "basic",
        "layers": [len(stage) for stage in stages],
        "num_classes": fc.out_features,
        "stem_width": net.conv1.out_channels,
        "widths": planes,
        "width_per_group": width_per_group,
        "dropout": dropout,
    }


def build_resnet(config: Mapping[str, Any]) -> ResNet:
    """A :class:`isnet_fast.ResNet` from :func:`resnet_config`'s dict."""
    config = dict(config)
    if config.get("block") not in BLOCKS:
        raise ValueError(f"a ResNet configuration needs block = one of {tuple(BLOCKS)}, got {config.get('block')!r}")
    config["layers"] = tuple(config["layers"])
    if "widths" in config:
        config["widths"] = tuple(config["widths"])
    return ResNet(**config)


def infer_resnet_config(state_dict: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The ResNet configuration a state dict's shapes fit (keys as a bare ResNet's: ``conv1.weight``,
    ``layer1.0.conv1.weight``, ..., ``fc.weight``), or None when they are no ResNet's.

    The block type is told by ``layer1.0.conv3.weight``, each stage's depth by its largest block
    index, the widths by the convolutions' shapes; ``dropout`` is None (off in eval anyway).
    """
    try:
        bottleneck = "layer1.0.conv3.weight" in state_dict
        layers, widths = [], []
        stage = 1
        while f"layer{stage}.0.conv1.weight" in state_dict:
            prefix = f"layer{stage}."
            indices = {int(key[len(prefix):].split(".", 1)[0]) for key in state_dict
                       if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0].isdigit()}
            layers.append(max(indices) + 1)
            if bottleneck:
                widths.append(int(state_dict[f"{prefix}0.conv3.weight"].shape[0]) // Bottleneck.expansion)
            else:
                widths.append(int(state_dict[f"{prefix}0.conv1.weight"].shape[0]))
            stage += 1
        if not layers:
            return None
        fc = state_dict.get("fc.weight", state_dict.get("fc.1.weight"))
        width_per_group = int(state_dict["layer1.0.conv1.weight"].shape[0]) * 64 // widths[0] if bottleneck else 64
        return {
            "block": "bottleneck" if bottleneck else "basic",
            "layers": layers,
            "num_classes": int(fc.shape[0]),
            "stem_width": int(state_dict["conv1.weight"].shape[0]),
            "widths": widths,
            "width_per_group": width_per_group,
            "dropout": None,
        }
    except (KeyError, IndexError, AttributeError, ValueError, ZeroDivisionError):
        return None


def known_resnet_name(config: Mapping[str, Any]) -> Optional[str]:
    """The torchvision name (resnet18, ...) of a :func:`resnet_config` / :func:`infer_resnet_config`
    configuration, or None when it is none of them."""
    shape = (config.get("stem_width"), tuple(config.get("widths", ())), config.get("width_per_group"))
    if shape != _TORCHVISION_RESNET_SHAPE:
        return None
    wanted = (config.get("block"), tuple(config.get("layers", ())))
    return next((name for name, known in _KNOWN_RESNETS.items() if known == wanted), None)
