"""Logistic regression and the FedAvg paper's MLP ("2NN")."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from fedjax_lab.core.types import Model
from fedjax_lab.models.base import Dense, from_linen


class Logistic(nn.Module):
    """features(x) is the flattened input (the identity representation) and head(z) = W z + b, so
    representation-level algorithms (FedRep-style heads, FedProto's prototypes) accept the linear
    model too: its body is empty and its whole parameter set is the head."""
    num_classes: int

    def features(self, x, train: bool = False):
        return x.reshape(x.shape[0], -1)

    @nn.compact
    def head(self, z):
        return Dense(self.num_classes)(z)   # param path "Dense_0", as before the split

    def __call__(self, x, train: bool = False):
        return self.head(self.features(x, train))


class MLP(nn.Module):
    num_classes: int
    hidden: Sequence[int] = (200, 200)

    def setup(self):
        self.hidden_layers = [Dense(h) for h in self.hidden]
        self.out = Dense(self.num_classes)

    def features(self, x, train: bool = False):
        z = x.reshape(x.shape[0], -1)
        for layer in self.hidden_layers:
            z = nn.relu(layer(z))
        return z

    def head(self, z):
        return self.out(z)

    def __call__(self, x, train: bool = False):
        return self.head(self.features(x, train))


class MLPBN(nn.Module):
    """The MLP with BatchNorm after every hidden Dense layer (Dense -> BN -> ReLU), the layout of
    FedBN's (Li et al., ICLR 2021) models; BatchNorm momentum 0.9 (PyTorch's 0.1)."""
    num_classes: int
    hidden: Sequence[int] = (200, 200)
    has_batch_norm = True

    def setup(self):
        self.hidden_layers = [Dense(h) for h in self.hidden]
        self.norms = [nn.BatchNorm(momentum=0.9) for _ in self.hidden]
        self.out = Dense(self.num_classes)

    def features(self, x, train: bool = False):
        z = x.reshape(x.shape[0], -1)
        for layer, norm in zip(self.hidden_layers, self.norms):
            z = nn.relu(norm(layer(z), use_running_average=not train))
        return z

    def head(self, z):
        return self.out(z)

    def __call__(self, x, train: bool = False):
        return self.head(self.features(x, train))


def logistic(num_classes: int) -> Model:
    """Multinomial logistic regression W x + b: (d + 1) * num_classes parameters
    (610 for FedProx's Synthetic: d = 60, 10 classes)."""
    return from_linen(Logistic(num_classes), "logistic")


def mlp(num_classes: int, hidden: Sequence[int] = (200, 200)) -> Model:
    """MLP with ReLU hidden layers; FedAvg's 2NN on MNIST (784-200-200-10) has 199,210 parameters."""
    return from_linen(MLP(num_classes, tuple(hidden)), "mlp")


def mlp_bn(num_classes: int, hidden: Sequence[int] = (200, 200)) -> Model:
    """The MLP with BatchNorm after each hidden layer; params {"params", "batch_stats"}."""
    return from_linen(MLPBN(num_classes, tuple(hidden)), "mlp_bn")
