"""Feature extractors that map an input sample to an ``embedding_dim`` vector.

Backbones are registered by name; ``protofed list`` prints them. Every backbone takes the
input shape of one sample (without the batch axis) and the embedding dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


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

    def __init__(self, input_shape: tuple[int, ...], embedding_dim: int, width: int = 32) -> None:
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
            layers += [nn.Conv1d(c_in, c_out, k, padding=k // 2), nn.BatchNorm1d(c_out), nn.ReLU(), nn.MaxPool1d(2, ceil_mode=True)]
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

    def __init__(self, input_shape: tuple[int, ...], embedding_dim: int, width: int = 64) -> None:
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
                nn.BatchNorm2d(width),
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
    name: str
    description: str
    build: Callable[[tuple[int, ...], int], nn.Module]


BACKBONES: dict[str, BackboneSpec] = {
    "mlp": BackboneSpec("mlp", "2 x 256 ReLU layers; any input (flattened)", MLP),
    "cnn1d": BackboneSpec("cnn1d", "3 strided 1-D conv layers; signals (C, L) such as mnist1d", CNN1D),
    "cnn": BackboneSpec("cnn", "4 conv blocks (ProtoNet style) + global pooling; images (C, H, W)", ConvNet),
}


class ProtoModel(nn.Module):
    """A backbone plus an optional linear head over all classes of the dataset."""

    def __init__(self, backbone: nn.Module, embedding_dim: int, num_classes: int, with_head: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.head: nn.Linear | None = nn.Linear(embedding_dim, num_classes) if with_head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def build_model(
    backbone: str,
    input_shape: tuple[int, ...],
    embedding_dim: int,
    num_classes: int,
    with_head: bool,
    init_seed: int,
) -> ProtoModel:
    """Build a model whose initial weights depend only on ``init_seed``."""
    spec = BACKBONES[backbone]
    devices: list[int] = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(init_seed)
        return ProtoModel(spec.build(tuple(input_shape), embedding_dim), embedding_dim, num_classes, with_head)
