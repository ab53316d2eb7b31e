"""isnet-fast: a fast, exact drop-in for ISNet's DenseNet LRP block, and the Faster ISNet variants."""

from .densenet import DenseNet, convert_torchvision_state_dict, densenet121, densenet161, densenet169, densenet201
from .loss import heatmap_loss
from .model import IsDenseFast
from .output import EXPLAIN_MODES

__all__ = [
    "DenseNet",
    "EXPLAIN_MODES",
    "IsDenseFast",
    "convert_torchvision_state_dict",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "heatmap_loss",
]

__version__ = "0.1.0"
