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


def logistic(num_classes: int) -> Model:
    """Multinomial logistic regression W x + b: (d + 1) * num_classes parameters
    (610 for FedProx's Synthetic: d = 60, 10 classes)."""
    return from_linen(Logistic(num_classes), "logistic")


def mlp(num_classes: int, hidden: Sequence[int] = (200, 200)) -> Model:
    """MLP with ReLU hidden layers; FedAvg's 2NN on MNIST (784-200-200-10) has 199,210 parameters."""
    return from_linen(MLP(num_classes, tuple(hidden)), "mlp")
