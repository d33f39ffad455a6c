"""Two-conv-layer CNNs: the FedAvg paper's MNIST CNN and the CIFAR CNN of PFLlib.

Both are  conv5x5(32) -> ReLU -> maxpool2 -> conv5x5(64) -> ReLU -> maxpool2 -> flatten
-> Dense(512) -> ReLU -> [dropout] -> Dense(num_classes)  (the softmax lives in the loss).
They differ only in the convolutions' padding:

* `cnn` (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
  Data", AISTATS 2017, Sec. 3): "two 5x5 convolution layers (the first with 32 channels, the
  second with 64, each followed with 2x2 max pooling), a fully connected layer with 512 units and
  ReLU activation, and a final softmax output layer (1,663,370 total parameters)". That count
  holds with SAME padding (28 -> 14 -> 7, 7*7*64 = 3136 inputs to the 512-unit layer):
  832 + 51,264 + 1,606,144 + 5,130 = 1,663,370 parameters on 28x28x1 MNIST with 10 classes.
* `cnn_cifar`: `FedAvgCNN` of PFLlib (Zhang et al., github.com/TsingZ0/PFLlib,
  system/flcore/trainmodel/models.py), PFLlib's default CNN ("--model CNN") on CIFAR-10/100,
  on which it benchmarks FedProto, FedGen, Ditto and its other algorithms side by side (the
  papers' own experiments used their own setups; we did not check each against this one).
  Same layers with VALID padding (`dim=1600` = 5*5*64 for 32x32 inputs):
  2,432 + 51,264 + 819,712 + 5,130 = 878,538 parameters on 32x32x3 CIFAR-10 (924,708 with 100
  classes). On 28x28x1 inputs (`dim=1024`) it has 582,026 parameters.

`cnn_widths` builds the same network with other widths (FedProto's heterogeneous clients); its
defaults give `cnn`'s parameters exactly (same names, shapes and initial values).

features(x) is the 512-unit ReLU layer (after dropout in training), head(z) the last Dense layer,
the same base/head split as PFLlib's `BaseHeadSplit`. Neither paper uses dropout; `dropout > 0`
adds it on the 512 features, keyed by the `rng` that local training folds per client and step.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from fedjax_lab.core import validate
from fedjax_lab.core.types import Model
from fedjax_lab.models.base import Dense, conv_general_dilated, from_linen


class CNN(nn.Module):
    num_classes: int
    padding: str = "SAME"
    dropout: float = 0.0
    channels: tuple = (32, 64)
    hidden: int = 512

    def setup(self):
        # the same convolution with a backward pass that stays fast inside lax loops on CPU
        conv = lambda c: nn.Conv(c, (5, 5), padding=self.padding,
                                 conv_general_dilated=conv_general_dilated)
        self.conv1 = conv(self.channels[0])
        self.conv2 = conv(self.channels[1])
        self.fc1 = Dense(self.hidden)
        self.drop = nn.Dropout(self.dropout)
        self.fc = Dense(self.num_classes)

    def features(self, x, train: bool = False):
        pool = max_pool_2x2
        z = pool(nn.relu(self.conv1(x)))
        z = pool(nn.relu(self.conv2(z)))
        z = nn.relu(self.fc1(z.reshape(z.shape[0], -1)))
        return self.drop(z, deterministic=not train or self.dropout == 0.0)

    def head(self, z):
        return self.fc(z)

    def __call__(self, x, train: bool = False):
        return self.head(self.features(x, train))


class CNNBN(nn.Module):
    """The two-conv CNN with BatchNorm after each convolution and the feature layer (conv -> BN ->
    ReLU -> pool, FC -> BN -> ReLU), FedBN's (Li et al., ICLR 2021) layout for digit domains."""
    num_classes: int
    padding: str = "SAME"
    channels: tuple = (32, 64)
    hidden: int = 512
    has_batch_norm = True

    def setup(self):
        conv = lambda c: nn.Conv(c, (5, 5), padding=self.padding,
                                 conv_general_dilated=conv_general_dilated)
        self.conv1, self.conv2 = conv(self.channels[0]), conv(self.channels[1])
        self.bn1, self.bn2, self.bn3 = (nn.BatchNorm(momentum=0.9) for _ in range(3))
        self.fc1 = Dense(self.hidden)
        self.fc = Dense(self.num_classes)

    def features(self, x, train: bool = False):
        ra = not train
        z = max_pool_2x2(nn.relu(self.bn1(self.conv1(x), use_running_average=ra)))
        z = max_pool_2x2(nn.relu(self.bn2(self.conv2(z), use_running_average=ra)))
        return nn.relu(self.bn3(self.fc1(z.reshape(z.shape[0], -1)), use_running_average=ra))

    def head(self, z):
        return self.fc(z)

    def __call__(self, x, train: bool = False):
        return self.head(self.features(x, train))


def max_pool_2x2(z):
    """nn.max_pool(z, (2, 2), strides=(2, 2)) (VALID: an odd last row/column is dropped).

    On CPU as a reshape and a max: XLA:CPU ran the gradient of reduce_window's max pooling
    (select-and-scatter) at ~8 ms per step of the FedAvg CNN's first layer, ~10x the reshape's
    (experiments/PERF_CNN.md). Same values; the gradient differs only where a window holds tied
    maxima: the reshape splits it evenly, reduce_window gives it to one element. After ReLU, ties
    at 0 get no gradient either way, and positive ties come from identical receptive fields
    (constant backgrounds), whose parameter gradients are then the same (tested on real digits).
    """
    if jax.default_backend() != "cpu":
        return nn.max_pool(z, (2, 2), strides=(2, 2))
    n, h, w, c = z.shape
    z = z[:, :h // 2 * 2, :w // 2 * 2]
    return z.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _check(num_classes, dropout):
    validate.positive("num_classes", num_classes, integer=True)
    validate.fraction("dropout", dropout, closed_right=False)


def cnn(num_classes: int, *, dropout: float = 0.0) -> Model:
    """FedAvg's MNIST CNN (SAME padding): 1,663,370 parameters on 28x28x1 with 10 classes."""
    _check(num_classes, dropout)
    return from_linen(CNN(num_classes, "SAME", float(dropout)), "cnn")


def cnn_bn(num_classes: int, *, channels=(32, 64), hidden: int = 512) -> Model:
    """The CNN with BatchNorm (CNNBN); params {"params", "batch_stats"}."""
    validate.positive("num_classes", num_classes, integer=True)
    validate.positive("hidden", hidden, integer=True)
    return from_linen(CNNBN(num_classes, "SAME", tuple(int(c) for c in channels), int(hidden)),
                      "cnn_bn")


def cnn_cifar(num_classes: int, *, dropout: float = 0.0) -> Model:
    """PFLlib's FedAvgCNN (VALID padding): 878,538 parameters on 32x32x3 with 10 classes."""
    _check(num_classes, dropout)
    return from_linen(CNN(num_classes, "VALID", float(dropout)), "cnn_cifar")


def cnn_widths(num_classes: int, *, channels=(32, 64), hidden: int = 512, padding: str = "SAME",
               dropout: float = 0.0) -> Model:
    """The same two-conv CNN with other widths: `channels` (conv1, conv2 output channels) and
    `hidden` (units of the feature layer, the representation `features` returns). The defaults
    are `cnn` itself (same parameter names and initial values); FedProto's model-heterogeneous
    setting gives clients 18 / 20 / 22 conv2 channels and one `hidden` (the prototype dimension)."""
    _check(num_classes, dropout)
    if (not isinstance(channels, (tuple, list)) or len(channels) != 2
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels)):
        raise ValueError(f"channels must be two positive ints (conv1, conv2 output channels), "
                         f"got {channels!r}")
    validate.positive("hidden", hidden, integer=True)
    validate.one_of("padding", padding, {"SAME", "VALID"})
    channels = tuple(int(c) for c in channels)
    return from_linen(CNN(num_classes, padding, float(dropout), channels, int(hidden)),
                      f"cnn_{padding.lower()}_c{channels[0]}x{channels[1]}_h{hidden}")
