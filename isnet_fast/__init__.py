"""isnet-fast: a fast, exact drop-in for ISNet's DenseNet LRP block, and the Faster ISNet variants."""

from .models.densenet import DenseNet, convert_torchvision_state_dict, densenet121, densenet161, densenet169, densenet201
from .loss import heatmap_loss
from .model import IsDenseFast
from .engine.output import EXPLAIN_MODES
from .models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from .resnet_model import IsResNetFast

__all__ = [
    "DenseNet",
    "EXPLAIN_MODES",
    "IsDenseFast",
    "IsResNetFast",
    "ResNet",
    "convert_torchvision_state_dict",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "heatmap_loss",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]

__version__ = "0.1.0"
