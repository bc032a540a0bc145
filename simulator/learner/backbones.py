"""Feature extractors that map an input sample to an ``embedding_dim`` vector.

Backbones are registered by name; ``protofed list`` prints them. Every backbone takes the
input shape of one sample (without the batch axis) and the embedding dimension; backbones with
normalisation layers also take ``norm`` (``model.norm``: batch | group | none).

Other installed packages add backbones through the ``protofed.backbones`` entry-point group
(see :mod:`simulator.plugins`)::

    [project.entry-points."protofed.backbones"]
    tiny = "my_package.nets:TINY"     # a BackboneSpec named "tiny" (or a function returning one)

A plugin's ``build(input_shape, embedding_dim)`` must return an ``nn.Module`` mapping a batch of
samples to ``[batch, embedding_dim]``; it receives ``norm=`` only if its spec lists the norms it
supports (``norms``), and a scenario asking a norm the backbone does not support is an error.

``model.pretrained`` loads a user-provided state dict into the backbone (never downloaded):
see :func:`load_pretrained`.

BatchNorm under weight averaging: every floating-point tensor of the backbone is shared by
weight-sharing strategies (:func:`simulator.records.shared_state`), so BatchNorm's running mean
and variance are FedAvg-averaged with the weights (sample-weighted, as Flower's FedAvg and most
FL code do); only the integer ``num_batches_tracked`` counter stays local. The averaged running
variance is the mean of the clients' variances, not the variance of the pooled data (it lacks
the spread of the client means). ``model.norm: batch_local`` keeps every BatchNorm layer local
(FedBN, Li et al. ICLR 2021: its affine weights and running statistics never travel, each client
normalises with its own statistics); ``group`` or ``none`` avoid running statistics altogether.
"""

from __future__ import annotations

import copy

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..paths import PACKAGED_WEIGHTS
from ..plugins import BACKBONE_GROUP, PluginError, Registry
from .resnet import BUILDERS as RESNETS
from .resnet import NORMS, norm_layer


class MLP(nn.Module):
    """Two hidden layers of 256 units; flattens any input shape."""

    def __init__(self, input_shape: tuple[int, ...], embedding_dim: int, hidden: int = 256) -> None:
        super().__init__()
        n_in = int(math.prod(input_shape))
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(n_in, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN1D(nn.Module):
    """Three 1-D conv blocks (conv, batch norm, ReLU, max pool) and a linear projection, for
    signals such as mnist1d. Accepts ``(channels, length)`` or ``(length,)`` samples."""

    def __init__(self, input_shape: tuple[int, ...], embedding_dim: int, width: int = 32, norm: str = "batch") -> None:
        super().__init__()
        if len(input_shape) == 1:
            channels, length = 1, input_shape[0]
        elif len(input_shape) == 2:
            channels, length = input_shape
        else:
            raise ValueError(f"cnn1d expects 1-D signals, got sample shape {input_shape}")
        self.add_channel = len(input_shape) == 1
        layers: list[nn.Module] = []
        c_in = channels
        for c_out, k in ((width, 5), (2 * width, 3), (2 * width, 3)):
            layers += [nn.Conv1d(c_in, c_out, k, padding=k // 2), norm_layer(norm, c_out, 1), nn.ReLU(), nn.MaxPool1d(2, ceil_mode=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            n_flat = self.features.eval()(torch.zeros(1, channels, length)).shape[1]
        self.features.train()
        self.proj = nn.Linear(n_flat, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.add_channel:
            x = x.unsqueeze(1)
        return self.proj(self.features(x))


class ConvNet(nn.Module):
    """Four conv blocks (3x3 conv, batch norm, ReLU, 2x2 max pool) as in prototypical networks,
    global average pooling, and a linear projection. Accepts ``(C, H, W)`` or ``(H, W)`` samples."""

    def __init__(self, input_shape: tuple[int, ...], embedding_dim: int, width: int = 64, norm: str = "batch") -> None:
        super().__init__()
        if len(input_shape) == 2:
            channels = 1
        elif len(input_shape) == 3:
            channels = input_shape[0]
        else:
            raise ValueError(f"cnn expects images (C, H, W), got sample shape {input_shape}")
        self.add_channel = len(input_shape) == 2
        blocks: list[nn.Module] = []
        c_in = channels
        for _ in range(4):
            blocks += [
                nn.Conv2d(c_in, width, 3, padding=1),
                norm_layer(norm, width, 2),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            c_in = width
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.proj = nn.Linear(width, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.add_channel:
            x = x.unsqueeze(1)
        return self.proj(self.features(x))


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone. ``norms``: the ``model.norm`` values ``build`` accepts as its
    ``norm=`` keyword (empty: the backbone has no normalisation layers to choose)."""

    name: str
    description: str
    build: Callable[..., nn.Module]
    norms: tuple[str, ...] = ()
    # named weights that ship with an installed package (``model.pretrained: imagenet``): name ->
    # a function returning the backbone's state dict (it may raise ImportError naming the extra)
    weights: Mapping[str, Callable[[], dict[str, torch.Tensor]]] = field(default_factory=dict)

    def make(self, input_shape: tuple[int, ...], embedding_dim: int, norm: str = "batch") -> nn.Module:
        if self.norms:
            return self.build(tuple(input_shape), embedding_dim, norm=norm)
        return self.build(tuple(input_shape), embedding_dim)


def _efficientnet_lite0(input_shape: tuple[int, ...], embedding_dim: int) -> nn.Module:
    from .efficientnet import EfficientNetLite0Backbone

    return EfficientNetLite0Backbone(input_shape, embedding_dim)


def _efficientnet_lite0_imagenet() -> dict[str, torch.Tensor]:
    from .efficientnet import imagenet_weights

    return imagenet_weights()


BUILTIN_BACKBONES: dict[str, BackboneSpec] = {
    "mlp": BackboneSpec("mlp", "2 x 256 ReLU layers; any input (flattened); no norm layers", MLP),
    "cnn1d": BackboneSpec("cnn1d", "3 strided 1-D conv layers; signals (C, L) such as mnist1d", CNN1D, NORMS),
    "cnn": BackboneSpec("cnn", "4 conv blocks (ProtoNet style) + global pooling; images (C, H, W)", ConvNet, NORMS),
    "resnet32": BackboneSpec(
        "resnet32", "CIFAR ResNet-32 of iCaRL/PyCIL (3 x 5 blocks, 16/32/64, ~0.46 M); images or 1-D signals",
        RESNETS["resnet32"], NORMS,
    ),
    "resnet18": BackboneSpec(
        "resnet18", "CIFAR ResNet-18 (3x3 stem, no max-pool, ~11.2 M); images or 1-D signals", RESNETS["resnet18"], NORMS
    ),
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite0",
        "EfficientNet-Lite0 (~4.7 M), images of 1 or 3 channels resized to 224; ImageNet weights with "
        "model.pretrained: imagenet (extra protofed[pretrained]); pooled 1280-d feature",
        _efficientnet_lite0, (), {"imagenet": _efficientnet_lite0_imagenet},
    ),
}


def _check_plugin(name: str, obj: Any) -> BackboneSpec:
    """A ``protofed.backbones`` entry point loads a BackboneSpec named like it, or a function
    without required arguments that returns one."""
    if not isinstance(obj, BackboneSpec) and callable(obj) and not isinstance(obj, type):
        try:
            required = [
                p for p in inspect.signature(obj).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        except (TypeError, ValueError):
            required = []
        if not required:
            obj = obj()
    if not isinstance(obj, BackboneSpec):
        raise PluginError(f"expected a simulator.learner.backbones.BackboneSpec (or a function returning one), got {obj!r}")
    if obj.name != name:
        raise PluginError(f"its name is {obj.name!r}; it must equal the entry point name {name!r}")
    if not callable(obj.build):
        raise PluginError("its build is not callable")
    bad = [n for n in obj.norms if n not in NORMS]
    if bad:
        raise PluginError(f"norms {bad} are not among {list(NORMS)}")
    return obj


BACKBONES: dict[str, BackboneSpec] = Registry(BUILTIN_BACKBONES, BACKBONE_GROUP, "backbone", _check_plugin)


class DualBranch(nn.Module):
    """APER's dual-branch feature extractor (``model.aper``; Zhou et al., IJCV 2024, APER-finetune;
    official ``RevisitingCIL`` ``models/aper_finetune.py`` and ``MultiBranchCosineIncrementalNet``):
    a frozen copy of the backbone as it was built (pre-trained, or as initialised) beside the
    backbone that adapts, the embedding being their concatenation ``[frozen(x), adapted(x)]``.

    The frozen branch never trains (no gradients; always in eval mode, whatever ``train()`` is
    called with) and never travels: :attr:`ProtoModel.never_shared` keeps its tensors out of
    :func:`simulator.records.shared_state`. Local training sees the adapted branch alone
    (:meth:`ProtoModel.train_features`), as the official fine-tuning does before the dual-branch
    network exists. Under ``share_weights: first_task`` the server freezes the averaged backbone
    for the first task's last round, in which every client embeds its first-task data with it
    (:attr:`strategies.base.FederatedStrategy.backbone_frozen`).

    Deviations from the official code:

    1. federated: the first task's fine-tuning is FedAvg of the clients' local training
       (``rounds_per_task - 1`` rounds of ``local_epochs``), not central training on the task's data;
    2. the loss is protofed's prototypical loss on the adapted features (with the known
       prototypes' adapted half), not cross-entropy of a cosine linear classifier with a learned
       scale; the optimiser is the scenario's SGD (momentum, weight decay) without the cosine
       learning-rate schedule;
    3. inference is the run's ``model.classifier`` (``ncm``: Euclidean nearest prototype, as
       protofed's SimpleCIL) instead of the cosine similarity to the prototypes;
    4. both branches exist from the start, the frozen one a copy of the initial weights taken when
       the model is built, where the official code builds the dual-branch network after the
       fine-tuning and loads the pre-trained weights again (the same weights);
    5. the first task's prototypes are embedded in a round of their own (the first task's last:
       the averaged backbone sent frozen, nothing trained), because a client must receive the
       averaged backbone before it can embed with it; the official code embeds right after its
       fine-tuning. Its training data is the client's own, so this stays class-incremental.
    """

    def __init__(self, adapted: nn.Module, width: int) -> None:
        super().__init__()
        self.width = width  # each branch's embedding width (model.embedding_dim)
        self.frozen = copy.deepcopy(adapted)
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        self.frozen.eval()
        self.adapted = adapted

    def train(self, mode: bool = True) -> "DualBranch":
        super().train(mode)
        self.frozen.eval()  # running statistics of the frozen branch never move
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.frozen(x), self.adapted(x)], dim=1)


class ProtoModel(nn.Module):
    """A backbone plus an optional linear head over all classes of the dataset (its input width is
    the feature width: ``embedding_dim``, twice that with APER's :class:`DualBranch`)."""

    def __init__(self, backbone: nn.Module, embedding_dim: int, num_classes: int, with_head: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.head: nn.Linear | None = nn.Linear(embedding_dim, num_classes) if with_head else None
        self.local_norm = False  # model.norm: batch_local (FedBN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    @property
    def aper(self) -> bool:
        return isinstance(self.backbone, DualBranch)

    @property
    def never_shared(self) -> tuple[str, ...]:
        """State-dict prefixes that never travel (APER's frozen branch)."""
        return ("backbone.frozen.",) if self.aper else ()

    def adaptable_parameters(self) -> list[nn.Parameter]:
        """The backbone parameters local training may change (APER: the adapted branch only)."""
        net = self.backbone.adapted if isinstance(self.backbone, DualBranch) else self.backbone
        return list(net.parameters())

    def train_features(self, x: torch.Tensor) -> torch.Tensor:
        """The features the task loss sees while the backbone trains: the embedding, or under APER
        the adapted branch's half of it (:attr:`train_columns` of the prototypes)."""
        if isinstance(self.backbone, DualBranch):
            return self.backbone.adapted(x)
        return self.backbone(x)

    @property
    def train_columns(self) -> slice:
        """The columns of an embedding (or prototype) that :meth:`train_features` gives."""
        if isinstance(self.backbone, DualBranch):
            return slice(self.backbone.width, None)
        return slice(None)


def build_model(
    backbone: str,
    input_shape: tuple[int, ...],
    embedding_dim: int,
    num_classes: int,
    with_head: bool,
    init_seed: int,
    norm: str = "batch",
    pretrained: dict[str, torch.Tensor] | None = None,
    aper: bool = False,
) -> ProtoModel:
    """Build a model whose initial weights depend only on ``init_seed`` (and ``pretrained``, a
    backbone state dict checked by :func:`load_pretrained`). With ``aper`` the backbone becomes a
    :class:`DualBranch` whose frozen branch copies the backbone just built (pretrained weights
    loaded); the adapted branch starts from the very weights the model without ``aper`` has."""
    spec = BACKBONES[backbone]
    devices: list[int] = []
    layers = "batch" if norm == "batch_local" else norm
    width = 2 * embedding_dim if aper else embedding_dim
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(init_seed)
        model = ProtoModel(spec.make(tuple(input_shape), embedding_dim, layers), width, num_classes, with_head)
    model.local_norm = norm == "batch_local"  # FedBN: BatchNorm layers never travel (records.shared_state)
    if pretrained is not None:
        load_pretrained(model.backbone, pretrained)
    if aper:
        model.backbone = DualBranch(model.backbone, embedding_dim)
    return model


class PretrainedError(ValueError):
    """A ``model.pretrained`` file that cannot be read or does not fit the backbone."""


def read_pretrained(path: str | Path, backbone: str | None = None) -> dict[str, torch.Tensor]:
    """Read a backbone state dict saved with ``torch.save`` (tensors only: ``weights_only``, so
    the file cannot run code). A whole protofed model's state dict (keys ``backbone.*`` and
    ``head.*``) is accepted too: its ``backbone.`` part is used. A name of packaged weights
    (``imagenet``, :data:`simulator.paths.PACKAGED_WEIGHTS`) gives ``backbone``'s own."""
    if str(path) in PACKAGED_WEIGHTS:
        spec = BACKBONES.get(backbone) if backbone is not None else None
        if spec is None or str(path) not in spec.weights:
            raise PretrainedError(f"backbone {backbone} ships no {str(path)!r} weights; give a state dict file")
        try:
            return dict(spec.weights[str(path)]())
        except ImportError as exc:
            raise PretrainedError(str(exc)) from None
    p = Path(path)
    if not p.is_file():
        raise PretrainedError(f"{path} is not a file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's error
        raise PretrainedError(f"cannot read {path} as a PyTorch state dict: {type(exc).__name__}: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise PretrainedError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    if state and all(k.startswith(("backbone.", "head.")) for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def load_pretrained(backbone: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``backbone`` with a strict check: every key must match, with its
    shape; the error names the missing, unexpected and mismatched keys."""
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:

        def few(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if shapes:
            parts.append(
                "shape mismatch: "
                + few([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes])
            )
        raise PretrainedError("the state dict does not fit the backbone (" + "; ".join(parts) + ")")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k].to(v.dtype))
