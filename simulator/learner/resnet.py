"""CIFAR-style residual networks, for images ``(C, H, W)`` and for 1-D signals ``(C, L)``.

* ``resnet32``: the CIFAR ResNet of iCaRL and PyCIL (He et al. 2016, section 4.2): a 3x3 stem of
  16 channels, then 3 stages of 5 basic blocks with 16, 32 and 64 channels (stride 2 at the start
  of stages 2 and 3), global average pooling -> a 64-d feature. The shortcut that changes the
  shape is He et al.'s option A (sub-sample, zero-pad the new channels: no parameters), as in the
  iCaRL and PyCIL code, which gives the well-known ~0.46 M parameters (463,504 for 3 channels).
* ``resnet18``: the CIFAR variant of the ImageNet ResNet-18 (a 3x3 stride-1 stem of 64 channels,
  no max-pool), 4 stages of 2 basic blocks with 64, 128, 256 and 512 channels, option B shortcuts
  (1x1 conv + norm) -> a 512-d feature; ~11.2 M parameters (11,168,832 for 3 channels).

Both accept any number of input channels and any input size (global average pooling). The same
code builds 1-D versions (``Conv1d``, kernel 3) when a sample is a signal: a sample of shape
``(L,)`` is one channel of length ``L``, ``(C, L)`` is ``C`` channels (as ``cnn1d``), and
``(C, H, W)`` is an image. (A 2-D sample is read as a signal, not as a one-channel image: use
``cnn`` or give the image a channel axis for 2-D convolutions.)

The embedding is the pooled feature itself when ``model.embedding_dim`` equals its width (64 for
resnet32, 512 for resnet18); otherwise a linear projection maps it to ``embedding_dim``.

``norm`` picks the normalisation layer after each convolution: ``batch`` (BatchNorm, the
papers' choice), ``group`` (GroupNorm with 2 groups, as in Hsieh et al. 2020 "The Non-IID Data
Quagmire", which keeps no running statistics) or ``none``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "group", "none")
GROUPS = 2  # GroupNorm groups (Hsieh et al. 2020); every width used here is even


def norm_layer(norm: str, channels: int, dims: int) -> nn.Module:
    """The normalisation layer for ``channels`` feature maps of a ``dims``-D convolution."""
    if norm == "batch":
        return nn.BatchNorm1d(channels) if dims == 1 else nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(GROUPS if channels % GROUPS == 0 else 1, channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; allowed: {', '.join(NORMS)}")


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv1d if dims == 1 else nn.Conv2d


def sample_layout(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, bool]:
    """``(channels, dims, add_channel_axis)`` of a sample shape (see the module docstring)."""
    if len(input_shape) == 1:
        return 1, 1, True
    if len(input_shape) == 2:
        return input_shape[0], 1, False
    if len(input_shape) == 3:
        return input_shape[0], 2, False
    raise ValueError(f"{name} expects signals (L,) / (C, L) or images (C, H, W), got sample shape {input_shape}")


class ShortcutA(nn.Module):
    """He et al.'s option A: take every ``stride``-th position and zero-pad the new channels."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.pad = c_out - c_in
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride] if x.dim() == 3 else x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            pad = [0, 0] * (x.dim() - 2) + [0, self.pad]
            x = F.pad(x, pad)
        return x


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, dims: int, norm: str, shortcut: str) -> None:
        super().__init__()
        conv = _conv(dims)
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(norm, c_out, dims)
        self.conv2 = conv(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm_layer(norm, c_out, dims)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            if shortcut == "A":
                self.shortcut = ShortcutA(c_in, c_out, stride)
            else:
                self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride=stride, bias=False), norm_layer(norm, c_out, dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A 3x3 stem and stages of basic blocks, global average pooling, optional projection."""

    def __init__(
        self,
        name: str,
        input_shape: tuple[int, ...],
        embedding_dim: int,
        widths: tuple[int, ...],
        blocks_per_stage: int,
        shortcut: str,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        channels, dims, self.add_channel = sample_layout(name, tuple(input_shape))
        conv = _conv(dims)
        layers: list[nn.Module] = [
            conv(channels, widths[0], 3, stride=1, padding=1, bias=False),
            norm_layer(norm, widths[0], dims),
            nn.ReLU(),
        ]
        c_in = widths[0]
        for i, width in enumerate(widths):
            for b in range(blocks_per_stage):
                stride = 2 if (i > 0 and b == 0) else 1
                layers.append(BasicBlock(c_in, width, stride, dims, norm, shortcut))
                c_in = width
        pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
        self.features = nn.Sequential(*layers, pool, nn.Flatten())
        self.feature_dim = c_in
        self.proj: nn.Module = nn.Identity() if embedding_dim == c_in else nn.Linear(c_in, embedding_dim)
        for m in self.modules():  # He initialisation of the convolutions, as in the reference code
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.add_channel:
            x = x.unsqueeze(1)
        return self.proj(self.features(x))


def resnet32(input_shape: tuple[int, ...], embedding_dim: int, norm: str = "batch") -> CifarResNet:
    return CifarResNet("resnet32", input_shape, embedding_dim, (16, 32, 64), 5, "A", norm)


def resnet18(input_shape: tuple[int, ...], embedding_dim: int, norm: str = "batch") -> CifarResNet:
    return CifarResNet("resnet18", input_shape, embedding_dim, (64, 128, 256, 512), 2, "B", norm)


BUILDERS: dict[str, Callable[..., nn.Module]] = {"resnet32": resnet32, "resnet18": resnet18}
