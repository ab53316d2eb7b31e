"""A PyTorch Lightning module that trains ISNet (IsDenseFast) on one or many GPUs and nodes.

Needs the optional extra: ``pip install isnet-fast[lightning]``. ``import isnet_fast`` does not
import this module (nor Lightning); import it as ``from isnet_fast.lightning import IsDenseFastLightning``.

It takes the hyperparameters of the original ISNet's ``IsDense121Lightning`` under the same
names, defaults and positions, so switching is a change of import::

    from isnet_fast.lightning import IsDense121Lightning   # an alias of IsDenseFastLightning
    module = IsDense121Lightning(multiLabel=False, multiMask=False, classes=3, P=0.7, d=0.9)
    lightning.Trainer(accelerator="gpu", devices=8, num_nodes=2, strategy="ddp",
                      gradient_clip_val=1.0, deterministic=True).fit(module, train_loader, val_loader)

Use ``lightning.Trainer`` (the ``lightning`` package); a ``pytorch_lightning.Trainer`` from the
separate ``pytorch-lightning`` package does not accept a ``lightning`` module.

Differences from the original module (all deliberate):

* Any DenseNet: ``architecture`` picks densenet121 (the original's only choice, the default),
  161, 169 or 201, or takes a dict of ``isnet_fast.DenseNet`` arguments, or a DenseNet instance.
  ``dropout`` (0.5, as the original's classifier) sets the classifier's dropout.
* Or a ResNet (an ``IsResNetFast``, the authors' ``LRPResNet``): resnet18, 34, 50, 101 or 152, a
  dict of ``isnet_fast.ResNet`` arguments (it has ``block`` and ``layers``), or a ResNet instance.
* ``E``, ``saveMaps`` and ``mapsLocation`` are accepted but have no effect, as in the original
  (the heatmap loss's E is ``Ea``); a warning says so when they are set.
* ``optim='Adam'`` uses ``torch.optim.Adam`` instead of DeepSpeed's ``FusedAdam`` (the same update
  with the original's zero weight decay), so DeepSpeed is not needed; an unknown ``optim``
  raises a ValueError instead of silently falling back to SGD.
* Lightning 2 no longer logs dicts, so the original's ``train_loss`` dict {Classifier, Heatmap,
  Sum} is logged as ``train_loss/Classifier``, ``train_loss/Heatmap`` and ``train_loss/Sum``
  (each as ``_step`` and ``_epoch`` values, the names Lightning gives the original's
  ``on_epoch=True``; ``train_loss_step`` and ``train_loss_epoch`` without heatmaps). Epoch values
  are averaged over all processes (the original's were rank 0's); step values are each
  process's. ``val_loss`` is the epoch mean over samples (the original: over batches), averaged
  over the processes as in the original, and ``val_loss/Classifier`` and ``val_loss/Heatmap``
  are logged as well.
* ``Cweight`` (BCE ``pos_weight`` in multi-label mode) is a non-persistent buffer restored from the
  hyperparameters, so checkpoints hold only the network's weights and load into ``IsDenseFast``.
  As in the original it is ignored in single-label mode (a warning says so).
* ``P`` must lie in [0, 1] (a ValueError otherwise; the original did not check).
* The original needed ``torch.backends.cudnn.deterministic = True``; this does not (it is still
  recommended for reproducible training, with ``Trainer(deterministic=True)``).

The ISNet variants take the names of the authors' newer module (``ISNetLgt`` in
``code/ISNetLightningZe.py``): ``selective``, ``highest``, ``randomLogit``, ``labelLogit``,
``multiple``, ``alternativeForeground`` and ``norm`` (see :class:`IsDenseFastLightning` for how
they map onto ``IsDenseFast``'s ``explain``/``selective``/``classes``), or ``explain=`` directly.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import lightning.pytorch as pl
except ImportError as error:  # the optional extra is not installed
    raise ImportError(
        "isnet_fast.lightning needs PyTorch Lightning, an optional dependency: "
        "pip install isnet-fast[lightning]") from error

from .architectures import DENSENET_ARCHITECTURES, NAMED_ARCHITECTURES, RESNET_ARCHITECTURES, is_resnet, \
    wrap_network
from .models.densenet import DenseNet, convert_torchvision_state_dict
from .loss import heatmap_loss
from .models.resnet import ResNet

__all__ = ["IsDenseFastLightning", "IsDense121Lightning", "ARCHITECTURES", "resolve_variant"]

ARCHITECTURES = tuple(NAMED_ARCHITECTURES)  # densenet121, ..., resnet18, ..., resnet152
OPTIMIZERS = ("SGD", "Adam")
_UNUSED_DEFAULTS = {"E": 10, "saveMaps": False, "mapsLocation": ""}


def _imagenet_state_dict(name: str) -> Mapping[str, torch.Tensor]:
    """torchvision's ImageNet weights for DenseNet or ResNet ``name`` (downloads them once)."""
    try:
        import torchvision
    except ImportError as error:
        raise ImportError("pretrained=True loads torchvision's ImageNet weights: "
                          "pip install isnet-fast[torchvision]") from error
    return torchvision.models.get_model_weights(name).DEFAULT.get_state_dict(progress=True)


def _build_network(architecture, classes: int, dropout: Optional[float], pretrained: bool) -> nn.Module:
    """The network ``architecture`` names or describes: a ResNet or a DenseNet."""
    names_a_resnet = (architecture in RESNET_ARCHITECTURES if isinstance(architecture, str) else
                      is_resnet(architecture) if isinstance(architecture, nn.Module) else
                      isinstance(architecture, Mapping) and ("block" in architecture or "layers" in architecture))
    if names_a_resnet:
        return _build_resnet(architecture, classes, dropout, pretrained)
    return _build_densenet(architecture, classes, dropout, pretrained)


def _build_resnet(architecture, classes: int, dropout: Optional[float], pretrained: bool) -> nn.Module:
    if isinstance(architecture, nn.Module):
        if pretrained:
            raise ValueError("pretrained=True needs an architecture name (resnet18, ...), not a ResNet instance")
        head = architecture.fc[-1] if isinstance(architecture.fc, nn.Sequential) else architecture.fc
        if isinstance(head, nn.Linear) and head.out_features != classes:
            raise ValueError(f"the ResNet's fc has {head.out_features} outputs but classes={classes}")
        return architecture  # used as it is: dropout does not apply
    if isinstance(architecture, str):
        net = RESNET_ARCHITECTURES[architecture](num_classes=classes, dropout=dropout)
        if pretrained:  # ImageNet weights but fc, which stays new; torchvision's keys are ours
            weights = OrderedDict((k, v) for k, v in _imagenet_state_dict(architecture).items()
                                  if not k.startswith("fc."))
            missing, unexpected = net.load_state_dict(weights, strict=False)
            missing = [key for key in missing if not key.startswith("fc.")]
            if missing or unexpected:
                raise RuntimeError(f"torchvision's {architecture} weights do not fit ours: missing "
                                   f"{missing[:2]}, unexpected {unexpected[:2]}")
        return net
    if pretrained:
        raise ValueError("pretrained=True needs an architecture name (resnet18, ...), not a dict")
    return ResNet(num_classes=classes, dropout=dropout, **dict(architecture))


def _build_densenet(architecture, classes: int, dropout: Optional[float], pretrained: bool) -> nn.Module:
    if isinstance(architecture, nn.Module):
        if pretrained:
            raise ValueError("pretrained=True needs an architecture name, not a DenseNet instance")
        head = getattr(architecture, "classifier", None)
        head = head[-1] if isinstance(head, nn.Sequential) and len(head) else head
        if isinstance(head, nn.Linear) and head.out_features != classes:
            raise ValueError(f"the DenseNet's classifier has {head.out_features} outputs but classes={classes}")
        return architecture  # used as it is: dropout does not apply
    if isinstance(architecture, str):
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, a dict of DenseNet or ResNet "
                             f"arguments or a DenseNet or ResNet instance; got {architecture!r}")
        net = DENSENET_ARCHITECTURES[architecture](num_classes=classes, dropout=dropout)
        if pretrained:  # ImageNet features; the classifier stays new, as in the original
            weights = convert_torchvision_state_dict(_imagenet_state_dict(architecture))
            features = OrderedDict((k, v) for k, v in weights.items() if not k.startswith("classifier."))
            net.features.load_state_dict(
                OrderedDict((k[len("features."):], v) for k, v in features.items()))
        return net
    if isinstance(architecture, Mapping):
        if pretrained:
            raise ValueError("pretrained=True needs an architecture name (densenet121, ...), not a dict")
        net = DenseNet(num_classes=classes, **dict(architecture))
        if dropout is not None:
            net.classifier = nn.Sequential(nn.Dropout(p=dropout), net.classifier)
        return net
    raise TypeError(f"architecture must be a name, a dict of DenseNet or ResNet arguments or a DenseNet or ResNet "
                    f"instance; got {type(architecture).__name__}")


def resolve_variant(selective: bool = False, highest: bool = False, randomLogit: bool = False,
                    labelLogit: bool = False, multiple: Optional[bool] = None,
                    explain: Optional[str] = None) -> Tuple[str, bool]:
    """``(explain, selective)`` for ``IsDenseFast`` from the authors' flags (or ``explain`` itself).

    The authors' rules (``code/ISNetLayersZe.py``, ``ISNetFunctionsZe.LRPOutput``): one of
    ``multiple``, ``highest``, ``randomLogit`` and a label picks the maps; ``highest`` explains
    argmax(y), or with ``selective`` the selective quantity of argmin(y) (the Selective ISNet);
    ``randomLogit`` is the Stochastic ISNet's draw and excludes ``selective``; ``multiple=False``
    with none of them explains all logits in one map. ``multiple=None`` (ours) means "as the
    other flags imply": True unless ``highest``, ``randomLogit`` or ``labelLogit`` is set. With
    ``labelLogit`` the steps explain the labels; the returned ``explain`` serves calls without
    labels (``forward``, ``predict_step``). Raises a ValueError for combinations that the
    authors' code refuses or that would be ambiguous.
    """
    for name, value in (("selective", selective), ("highest", highest), ("randomLogit", randomLogit),
                        ("labelLogit", labelLogit)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if multiple is not None and not isinstance(multiple, bool):
        raise TypeError(f"multiple must be True, False or None, got {multiple!r}")
    if explain is not None:
        given = [name for name, value in (("highest", highest), ("randomLogit", randomLogit)) if value]
        if multiple is not None:
            given.append("multiple")
        if given:
            raise ValueError(f"explain={explain!r} already names the maps; leave out {', '.join(given)} (the "
                             "authors' names for the same choice), or drop explain")
        return explain, selective
    picks = [name for name, value in (("highest", highest), ("randomLogit", randomLogit),
                                      ("labelLogit", labelLogit), ("multiple", multiple is True)) if value]
    if len(picks) > 1:
        raise ValueError(f"{' and '.join(picks)} each choose which maps are made; set only one "
                         "(the authors' code: 'Choose label, randomLogit, multiple or highest')")
    if randomLogit:
        if selective:
            raise ValueError("randomLogit and selective cannot be combined under the authors' names ('Set "
                             "randomLogit or selective, not both'); for a selective Stochastic ISNet pass "
                             "explain='random', selective=True")
        return "random", False
    if highest:
        return ("lowest" if selective else "top"), selective
    if multiple is False and not labelLogit:
        if selective:
            raise ValueError("selective=True with multiple=False needs highest=True (the Selective ISNet) or "
                             "labelLogit=True: the selective quantity is one class's, not the sum of the logits")
        return "sum", False
    return "all", selective


def _cut_value(value):
    """A float stays a float; a per-class list or tensor becomes a float32 tensor."""
    if torch.is_tensor(value):
        return value.detach().float().clone()
    if isinstance(value, (list, tuple)):
        return torch.tensor(value, dtype=torch.float32)
    return float(value)


class IsDenseFastLightning(pl.LightningModule):
    """ISNet (IsDenseFast around a DenseNet, or IsResNetFast around a ResNet) as a LightningModule,
    for (multi-GPU, multi-node) training.

    Batches are ``(images, masks, labels)`` (``(images, labels)`` when ``heat`` is False):
    images ``B x 3 x H x W``; masks ``B x ch x H x W`` (1 = foreground, ``ch`` 1 or 3), or
    ``B x classes x ch x H x W`` with ``multiMask``; labels ``B`` or ``B x 1`` class indices, or
    ``B x classes`` class probabilities (one-hot), or ``B x classes`` multi-hot floats with
    ``multiLabel``. The training loss is ``(1 - P) * classifier loss + P * heatmap loss``.

    Model:
        multiLabel: multi-label problem: binary cross-entropy with logits (else cross-entropy).
        multiMask: one foreground mask per class.
        classes: number of classes.
        e: LRP epsilon (the original's default 10e-2, i.e. 0.1).
        heat: compute heatmaps and train with the heatmap loss; False trains a plain DenseNet.
        Zb: z^B rule at the input (else the epsilon rule).
        pretrained: start from torchvision's ImageNet weights (needs torchvision and a name).
    Training:
        LR: learning rate. P: heatmap loss weight. optim: 'SGD' (with ``momentum``) or 'Adam'.
        Cweight: BCE ``pos_weight`` (one per class) for unbalanced multi-label data.
    Heatmap loss (see ``isnet_fast.heatmap_loss``): A, B (W1, W2), d (GWRP decay), Ea (its E),
        normRoI, norm, cut, cut2 (C1, C2: floats or per-class lists/tensors), alternativeCut,
        detachNorm, var, eps.
    Accepted for compatibility, no effect (as in the original): E, saveMaps, mapsLocation.
    Beyond the original (keyword only):
        architecture: 'densenet121' (default), 'densenet161', 'densenet169', 'densenet201', a
            dict of ``isnet_fast.DenseNet`` arguments, or a DenseNet instance (then not saved
            in the hyperparameters: pass it again to ``load_from_checkpoint``); or a ResNet,
            an ``IsResNetFast``: 'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152'
            (``pretrained``: torchvision's ImageNet weights, all but ``fc``), a dict of
            ``isnet_fast.ResNet`` arguments (with ``block`` and ``layers``), or a ResNet instance.
        dropout: classifier dropout (``Sequential(Dropout, Linear)``), None for a bare Linear.
        reference_quirks (True), reference_pairing (None; the DenseNet's only), backend: passed to
            ``IsDenseFast`` / ``IsResNetFast`` (``reference_quirks=False``: the LRP rules as written).
    ISNet variants, the authors' newer names (``ISNetLgt``, ``code/ISNetLightningZe.py``), keyword only:
        selective (False): explain the class-selective quantity instead of the logits.
        highest (False): one map per image, for argmax(y); with ``selective`` for argmin(y).
        randomLogit (False): one map per image, the Stochastic ISNet's draw (a fair coin per
            batch: the top class, or one drawn among the others); not with ``selective``.
        labelLogit (False): one map per image, for its label (``IsDenseFast(x, classes=labels)``);
            single-label only (multiLabel raises). The authors warn it is for explanation rather
            than ISNet training; it trains here all the same.
        multiple (None): the authors' flag for one map per class (their default True, which they
            require False with highest, randomLogit or a label); None infers it. ``multiple=False``
            alone explains the sum of the logits in one map.
        alternativeForeground ('L2'): the heatmap loss's foreground term, 'L2' (the original's),
            'L1' or 'hybrid' (the Faster ISNet paper's; the authors' newer module defaults to it:
            pass it explicitly for their setting).
        norm (True): the heatmap normalisation, True/False or 'absRoIMean', 'RoIMean', 'none'.
        explain (None): ``IsDenseFast``'s name for the maps, "all", "top", "lowest", "random" or
            "sum"; instead of highest/randomLogit/multiple (not with them), with ``selective``.

    How the names map onto ``IsDenseFast`` (``explain``, ``selective``; :func:`resolve_variant`):

    ======================================================  ==================================
    authors' flags                                          IsDenseFast
    ======================================================  ==================================
    (none: multiple=True) -- Original ISNet                 explain="all"
    highest=True                                            explain="top"
    selective=True, highest=True -- Selective ISNet         explain="lowest", selective=True
    randomLogit=True -- Stochastic ISNet                    explain="random"
    labelLogit=True (with selective: selective quantity)    forward(x, classes=labels)
    multiple=False                                          explain="sum"
    selective=True                                          explain="all", selective=True
    ======================================================  ==================================

    Invalid combinations raise a ValueError: two of highest, randomLogit, labelLogit and
    multiple=True; randomLogit with selective (use ``explain='random', selective=True``);
    selective with multiple=False alone; explain= with highest, randomLogit or multiple;
    labelLogit with multiLabel; multiMask with a one-map variant whose class the logits do not
    tell ("random", "sum"); and what IsDenseFast refuses (e.g. ``explain='sum', selective=True``,
    an unknown explain). With labelLogit the labels are
    explained in training, validation and test steps (the authors' module: training only), and
    ``forward``/``predict_step`` without labels use the ``explain`` above. With ``multiMask`` and
    one map per image, each image's mask for the explained class is used.

    The network is ``self.model`` (an ``IsDenseFast``; ``self.DenseNet`` is its DenseNet), so
    checkpoint keys are ``model.DenseNet.*`` and ``IsDenseFast.load_state_dict`` takes them; for a
    ResNet an ``IsResNetFast``, keys ``model.resnet.*`` (``self.network`` is either network).
    ``load_state_dict`` also takes the original module's checkpoints (``DenseNet.*``,
    ``LRPBlock.*`` and ``Cweight`` keys; an LRPResNet's ``resnet.*``). After ``trainer.test``,
    ``self.TestResults`` holds this process's ``(logits, labels, images, heatmaps)`` (``(logits,
    labels)`` without heat).
    """

    def __init__(self, multiLabel: bool, multiMask: bool, classes: int,
                 e: float = 10e-2, heat: bool = True, Zb: bool = True, pretrained: bool = False,
                 LR: float = 1e-3, P: float = 0.7, E: float = 10, saveMaps: bool = False,
                 mapsLocation: str = "", optim: str = "SGD", Cweight: Optional[torch.Tensor] = None,
                 A: float = 1, B: float = 3, d: float = 0.9, Ea: float = 1, normRoI: bool = True,
                 norm: Union[bool, str] = True, cut: Union[float, Sequence[float], torch.Tensor] = 1,
                 cut2: Union[float, Sequence[float], torch.Tensor] = 25, alternativeCut: bool = False,
                 detachNorm: bool = False, var: bool = False, eps: float = 1e-10, momentum: float = 0.99,
                 *, architecture: Union[str, Mapping[str, Any], nn.Module] = "densenet121",
                 dropout: Optional[float] = 0.5, reference_pairing: Optional[bool] = None, backend: str = "auto",
                 selective: bool = False, highest: bool = False, randomLogit: bool = False,
                 labelLogit: bool = False, multiple: Optional[bool] = None, alternativeForeground: str = "L2",
                 explain: Optional[str] = None, reference_quirks: bool = True):
        super().__init__()
        self.save_hyperparameters(ignore=["architecture"] if isinstance(architecture, nn.Module) else None)
        if optim not in OPTIMIZERS:
            raise ValueError(f"optim must be one of {OPTIMIZERS}, got {optim!r}")
        if not 0 <= P <= 1:
            raise ValueError(f"P weighs the heatmap loss against the classifier loss and must be in [0, 1]; got {P}")
        given = {"E": E, "saveMaps": saveMaps, "mapsLocation": mapsLocation}
        unused = [name for name, value in given.items() if value != _UNUSED_DEFAULTS[name]]
        if unused:
            warnings.warn(f"{', '.join(unused)} had no effect in the original module and have none here"
                          + ("; the heatmap loss's E is Ea" if "E" in unused else ""), stacklevel=2)
        if Cweight is not None and not multiLabel:
            warnings.warn("Cweight (BCE pos_weight) is only used with multiLabel=True, as in the original",
                          stacklevel=2)
        explain, selective = resolve_variant(selective, highest, randomLogit, labelLogit, multiple, explain)
        if labelLogit and multiLabel:
            raise ValueError("labelLogit explains one class per image, its label; multi-label targets name several "
                             "or none. Use labelLogit=False with multiLabel=True")
        if multiMask and not labelLogit and explain in ("random", "sum"):
            raise ValueError(f"multiMask gives a mask per class, but explain={explain!r} makes one map per image "
                             "whose class is not known from the logits; use the Original ISNet (one map per class), "
                             "highest=True (top or, with selective, lowest) or labelLogit=True")

        self.model = wrap_network(_build_network(architecture, classes, dropout, pretrained), e=e, heat=heat,
                                  Zb=Zb, explain=explain, selective=selective,
                                  reference_pairing=reference_pairing, reference_quirks=reference_quirks,
                                  backend=backend)
        self.labelLogit = labelLogit
        self.lr = LR  # an attribute, so Lightning's learning-rate finder can tune it
        self.P = P
        self.multiLabel = multiLabel
        self.multiMask = multiMask
        self.optim = optim
        self.momentum = momentum
        self.loss_options = dict(norm=norm, A=A, B=B, d=d, E=Ea, normRoI=normRoI, var=var,
                                 alternativeCut=alternativeCut, detachNorm=detachNorm, eps=eps,
                                 alternativeForeground=alternativeForeground)
        # Tensors live in non-persistent buffers: they follow the module's device, and state
        # dicts (checkpoints) hold only the network.
        for name, value in (("cut", _cut_value(cut)), ("cut2", _cut_value(cut2))):
            if torch.is_tensor(value):
                self.register_buffer(name, value, persistent=False)
            else:
                setattr(self, name, value)
        pos_weight = None if Cweight is None else torch.as_tensor(Cweight, dtype=torch.float32).detach().clone()
        self.register_buffer("Cweight", pos_weight, persistent=False)
        self.TestResults = None
        self._test_outputs = []

    # -- the network ---------------------------------------------------------------------------
    @property
    def DenseNet(self) -> nn.Module:
        """The DenseNet inside (the original module's attribute); a ResNet's module has ``network``."""
        return self.model.DenseNet

    @property
    def network(self) -> nn.Module:
        """The network inside, a DenseNet (``model.DenseNet``) or a ResNet (``model.resnet``)."""
        return self.model.resnet if is_resnet(self.model) else self.model.DenseNet

    @property
    def heat(self) -> bool:
        """Whether ``forward`` computes heatmaps and training uses the heatmap loss."""
        return self.model.heat

    @heat.setter
    def heat(self, value: bool):
        self.model.heat = bool(value)

    @property
    def explain(self) -> str:
        """The IsDenseFast's ``explain``: which maps ``forward`` makes without labels."""
        return self.model.explain

    @property
    def selective(self) -> bool:
        """Whether the maps explain the class-selective quantity."""
        return self.model.selective

    def forward(self, x: torch.Tensor, classes: Optional[torch.Tensor] = None):
        """``(logits, heatmaps)``, or only the logits when ``heat`` is False; ``classes`` (one
        index per image) explains those classes, one map per image."""
        return self.model(x, classes=classes)

    def label_classes(self, labels: torch.Tensor) -> torch.Tensor:
        """Class indices (``B``) from single-label labels: ``B`` or ``B x 1`` indices, or ``B x classes``
        probabilities (one-hot; the most probable class)."""
        if self.multiLabel:
            raise ValueError("labelLogit needs single-label classes; multiLabel=True has none per image")
        if labels.dim() == 2 and labels.shape[1] == 1:  # the original's B x 1 layout
            labels = labels.squeeze(1)
        elif labels.dim() == 2:
            labels = labels.argmax(1)
        return labels.long()

    def _explained_masks(self, masks, logits, classes):
        """With multiMask and one map per image: each image's mask for the class its map explains."""
        if classes is None:
            if self.model.explain not in ("top", "lowest"):
                raise ValueError(f"multiMask with explain={self.model.explain!r}: the class of each image's one map "
                                 "is not known; use explain 'all', 'top' or 'lowest', or labelLogit")
            classes = self.model.explained_classes(logits.detach())
        index = torch.arange(masks.shape[0], device=masks.device)
        return masks[index, classes.to(masks.device)].unsqueeze(1)

    # -- losses --------------------------------------------------------------------------------
    def classifier_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.multiLabel:
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), pos_weight=self.Cweight)
        if not torch.is_floating_point(labels) and labels.dim() == 2 and labels.shape[1] == 1:
            labels = labels.squeeze(1)  # B x 1 class indices, the original's layout
        return F.cross_entropy(logits, labels)

    def compound_loss(self, outputs, labels, heatmaps=None, masks=None):
        """The classifier loss, and with heatmaps the heatmap loss too: ``(classifier, heatmap)``."""
        classifier = self.classifier_loss(outputs, labels)
        if heatmaps is None:
            return classifier
        heatmap = heatmap_loss(heatmaps, masks, cut=self.cut, cut2=self.cut2, multiMask=self.multiMask,
                               **self.loss_options)
        return classifier, heatmap

    def _unpack(self, batch):
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise ValueError("batches must be (images, masks, labels), or (images, labels) when heat=False")
        if len(batch) == 2:
            if self.heat:
                raise ValueError("heat=True needs batches of (images, masks, labels); got 2 items")
            return batch[0], None, batch[1]
        return batch[0], batch[1], batch[2]

    def _heatmaps(self, images, labels):
        """``(logits, heatmaps, classes)``: the maps this module's variant makes for a labelled batch."""
        classes = self.label_classes(labels) if self.labelLogit else None
        logits, heatmaps = self(images, classes)
        return logits, heatmaps, classes

    def _losses(self, batch):
        """``(loss, classifier loss, heatmap loss or None, batch size)``."""
        images, masks, labels = self._unpack(batch)
        if self.heat:
            logits, heatmaps, classes = self._heatmaps(images, labels)
            if self.multiMask and heatmaps.shape[1] == 1 and masks.dim() == 5 and masks.shape[1] != 1:
                masks = self._explained_masks(masks, logits, classes)
            classifier, heatmap = self.compound_loss(logits, labels, heatmaps, masks)
            return (1 - self.P) * classifier + self.P * heatmap, classifier, heatmap, images.shape[0]
        classifier = self.compound_loss(self(images), labels)
        return classifier, classifier, None, images.shape[0]

    # -- Lightning hooks -----------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        loss, classifier, heatmap, size = self._losses(batch)
        if torch.isnan(loss):
            raise ValueError("NaN training loss, aborting")
        if heatmap is None:
            values = {"train_loss": loss}
        else:
            values = {"train_loss/Classifier": classifier, "train_loss/Heatmap": heatmap, "train_loss/Sum": loss}
        # The names Lightning gives a value logged on_step and on_epoch, but only the epoch means
        # are averaged over the processes (once, at the epoch's end): the step values are this
        # process's, with no communication per step.
        self.log_dict({name + "_step": value for name, value in values.items()},
                      on_step=True, on_epoch=False, batch_size=size)
        self.log_dict({name + "_epoch": value for name, value in values.items()},
                      on_step=False, on_epoch=True, sync_dist=True, batch_size=size)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, classifier, heatmap, size = self._losses(batch)
        values = {"val_loss": loss}
        if heatmap is not None:
            values.update({"val_loss/Classifier": classifier, "val_loss/Heatmap": heatmap})
        self.log_dict(values, on_step=False, on_epoch=True, sync_dist=True, batch_size=size)
        return loss

    def on_test_epoch_start(self):
        self._test_outputs = []

    def test_step(self, batch, batch_idx):
        images, _, labels = self._unpack(batch)
        if self.heat:
            logits, heatmaps, _ = self._heatmaps(images, labels)
            self._test_outputs.append((logits.detach().cpu(), labels.detach().cpu(),
                                       images.detach().cpu().float(), heatmaps.detach().cpu().float()))
        else:
            self._test_outputs.append((self(images).detach().cpu(), labels.detach().cpu()))

    def on_test_epoch_end(self):
        if self._test_outputs:
            self.TestResults = tuple(torch.cat(parts, dim=0) for parts in zip(*self._test_outputs))
        self._test_outputs = []

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optim == "Adam":
            return torch.optim.Adam(params, lr=self.lr)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=0)

    # -- checkpoints ---------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Loads this module's state dicts and the original ``IsDense121Lightning``'s.

        The original's ``DenseNet.*`` keys go to ``model.DenseNet.*`` (an LRPResNet's ``resnet.*``
        to ``model.resnet.*``); its ``LRPBlock.*`` keys (aliases of the network's parameters) are
        dropped, and its ``Cweight`` is copied into this module's ``Cweight`` when that is set
        (both are the hyperparameter's value).
        """
        cleaned = OrderedDict()
        for key, value in state_dict.items():
            if key.startswith("LRPBlock.") or ".LRPBlock." in key:
                continue
            if key == "Cweight":
                if self.Cweight is not None:
                    self.Cweight.copy_(value)
                continue
            if key.startswith(("DenseNet.", "resnet.")):
                key = "model." + key
            cleaned[key] = value
        return super().load_state_dict(cleaned, strict=strict, assign=assign)


IsDense121Lightning = IsDenseFastLightning
"""The original module's name; with ``architecture='densenet121'`` (the default) it is the same network."""
