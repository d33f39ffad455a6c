"""ResNet-8 (and the rest of the CIFAR ResNet-(6n+2) family) with GroupNorm.

The CIFAR ResNets of He et al. ("Deep Residual Learning for Image Recognition", CVPR 2016,
Sec. 4.2): a 3x3 conv with 16 channels, then three stages of n basic blocks with 16, 32 and 64
channels (stride 2 at the start of stages 2 and 3), global average pooling and a Dense layer:
6n + 2 weight layers, so ResNet-8 is n = 1. A basic block is
    y = relu(x' + GN(conv3x3(relu(GN(conv3x3(x))))))
with x' = x, or GN(conv1x1(x)) (a projection, He et al.'s option B) where the shape changes.
Convolutions have no bias (the normalization's offset plays that role).

Batch statistics: there are none. BatchNorm would keep running means/variances that FedAvg then
averages across clients whose feature distributions differ, and the running statistics of one
client's non-iid batches are wrong for the global model (Hsieh et al., "The Non-IID Data Quagmire
of Decentralized Machine Learning", ICML 2020). Following their fix, we use GroupNorm (Wu & He,
ECCV 2018; 2 groups by default, as Hsieh et al.), which normalizes each example over groups of
channels: no mutable collection, identical behaviour in training and evaluation, nothing to
aggregate but ordinary parameters, and no coupling between examples or clients under vmap.

Parameters on 32x32x3 inputs with 10 classes: ResNet-8 78,042; ResNet-20 272,474.
features(x) is the pooled 64-d vector, head(z) the final Dense layer.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from fedjax_lab.core import validate
from fedjax_lab.core.types import Model
from fedjax_lab.models.base import Dense, conv_general_dilated, from_linen

WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    channels: int
    strides: int
    num_groups: int

    @nn.compact
    def __call__(self, x):
        norm = lambda: nn.GroupNorm(num_groups=self.num_groups)
        conv = lambda k, s: nn.Conv(self.channels, (k, k), strides=(s, s), padding="SAME",
                                    use_bias=False, conv_general_dilated=conv_general_dilated)
        y = nn.relu(norm()(conv(3, self.strides)(x)))
        y = norm()(conv(3, 1)(y))
        if self.strides != 1 or x.shape[-1] != self.channels:
            x = norm()(conv(1, self.strides)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    num_classes: int
    depth: int = 8
    num_groups: int = 2

    def setup(self):
        n = (self.depth - 2) // 6
        self.stem = nn.Conv(WIDTHS[0], (3, 3), padding="SAME", use_bias=False,
                            conv_general_dilated=conv_general_dilated)
        self.stem_norm = nn.GroupNorm(num_groups=self.num_groups)
        self.blocks = [BasicBlock(w, 2 if (i == 0 and stage > 0) else 1, self.num_groups)
                       for stage, w in enumerate(WIDTHS) for i in range(n)]
        self.fc = Dense(self.num_classes)

    def features(self, x, train: bool = False):
        z = nn.relu(self.stem_norm(self.stem(x)))
        for block in self.blocks:
            z = block(z)
        return jnp.mean(z, axis=(1, 2))

    def head(self, z):
        return self.fc(z)

    def __call__(self, x, train: bool = False):
        return self.head(self.features(x, train))


def resnet(num_classes: int, *, depth: int = 8, num_groups: int = 2) -> Model:
    """CIFAR ResNet-`depth` (depth = 6n + 2) with GroupNorm(`num_groups`)."""
    validate.positive("num_classes", num_classes, integer=True)
    validate.positive("depth", depth, integer=True)
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 for some n >= 1 (8, 14, 20, ...), got {depth}")
    validate.positive("num_groups", num_groups, integer=True)
    if any(w % num_groups for w in WIDTHS):
        raise ValueError(f"num_groups must divide every stage width {WIDTHS}, got {num_groups}")
    return from_linen(ResNet(num_classes, depth, num_groups), f"resnet{depth}")


def resnet8(num_classes: int, *, num_groups: int = 2) -> Model:
    """ResNet-8 with GroupNorm: 78,042 parameters on 32x32x3 inputs with 10 classes."""
    return resnet(num_classes, depth=8, num_groups=num_groups)
