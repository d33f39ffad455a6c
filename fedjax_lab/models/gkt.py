"""FedGKT's two models (He, Annavaram, Avestimehr, NeurIPS 2020), CPU-sized.

The paper splits a CNN between an edge client and the server: the client holds a small feature
extractor f_e (ResNet-8's stem and blocks) with a small classifier f_c, and the server a much larger
model f_s (ResNet-55 / 109) that takes the client's feature map H = f_e(x) as its input:

    z_c = f_c(f_e(x))        the client's logits (the small model alone)
    z_s = f_s(f_e(x))        the server's logits (the pair)

Here, sized for scikit-learn digits (8x8x1) and MNIST-1D (40 samples) on a CPU:

* `gkt_client(num_classes, channels=8)`: features(x) = ReLU(conv3(x)) keeps the input's spatial size
  ([H, W, channels] for images, [L, channels] for signals [L]); head(H) = Dense(mean over space of
  H): a global-average-pooled linear classifier, like ResNet-8's.
* `gkt_server(num_classes, channels=(32,), hidden=128)`: convolutions (3x3, SAME) on H, then a
  ReLU layer of `hidden` units and the output layer; features/head split at the hidden layer.
* `gkt_pair(num_classes, ...)`: a `GKTPair` Model, the large model f_s o f_e as one network
  (params {"client": ..., "server": ...}; FedAvg of it is the paper's baseline), carrying its
  `client` and `server` halves for `algorithms.fedgkt`. Its features are the client's H and its
  head the server model, so apply == head o features.

No pretrained stem: the official code copies the first layers of a pretrained ResNet-56 into the
client's extractor (`--weight_init_model resnet32/56`); every model here starts from its random init.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from fedjax_lab.core import validate
from fedjax_lab.core.types import Model
from fedjax_lab.models.base import Dense, conv_general_dilated, from_linen


def _spatial(x):
    """Signals [n, L] become [n, L, 1] (1-D convolutions); images [n, H, W, C] stay."""
    return x[..., None] if x.ndim == 2 else x


def _conv(channels, nd):
    return nn.Conv(channels, (3,) * nd, padding="SAME", conv_general_dilated=conv_general_dilated)


class GKTClient(nn.Module):
    num_classes: int
    channels: int = 8

    def setup(self):
        self.classifier = Dense(self.num_classes)

    @nn.compact
    def features(self, x, train: bool = False):
        x = _spatial(x)
        return nn.relu(_conv(self.channels, x.ndim - 2)(x))

    def head(self, z):
        return self.classifier(jnp.mean(z, axis=tuple(range(1, z.ndim - 1))))

    def __call__(self, x, train: bool = False):
        return self.head(self.features(x, train))


class GKTServer(nn.Module):
    num_classes: int
    channels: Sequence[int] = (32,)
    hidden: int = 128

    def setup(self):
        self.fc = Dense(self.hidden)
        self.out = Dense(self.num_classes)

    @nn.compact
    def features(self, h, train: bool = False):
        for c in self.channels:
            h = nn.relu(_conv(c, h.ndim - 2)(h))
        return nn.relu(self.fc(h.reshape(h.shape[0], -1)))

    def head(self, z):
        return self.out(z)

    def __call__(self, h, train: bool = False):
        return self.head(self.features(h, train))


@dataclasses.dataclass(frozen=True, eq=False)
class GKTPair(Model):
    """f_s o f_e as one Model (module docstring), with its halves for FedGKT."""
    client: Optional[Model] = None
    server: Optional[Model] = None


def _check(num_classes, channels, hidden=None):
    validate.positive("num_classes", num_classes, integer=True)
    for c in (channels if isinstance(channels, (tuple, list)) else (channels,)):
        validate.positive("channels", c, integer=True)
    if hidden is not None:
        validate.positive("hidden", hidden, integer=True)


def gkt_client(num_classes: int, *, channels: int = 8) -> Model:
    """The edge model: one 3x3 (or 3-tap) convolution of `channels` as f_e, a pooled linear f_c."""
    _check(num_classes, channels)
    return from_linen(GKTClient(num_classes, channels), "gkt_client")


def gkt_server(num_classes: int, *, channels: Sequence[int] = (32,), hidden: int = 128) -> Model:
    """The server model f_s on the client's feature map: convolutions, a hidden layer, the output."""
    channels = tuple(channels)
    _check(num_classes, channels, hidden)
    return from_linen(GKTServer(num_classes, channels, hidden), "gkt_server")


def pair(client: Model, server: Model, name: str = "gkt_pair") -> GKTPair:
    """The large model f_s o f_e of a client model with `features` and a server model."""
    def init(key, x):
        import jax
        k_c, k_s = jax.random.split(key)
        pc = client.init(k_c, x)
        return {"client": pc, "server": server.init(k_s, client.features(pc, x))}

    def features(params, x, *, train=False, rng=None):
        return client.features(params["client"], x, train=train, rng=rng)

    def head(params, h):
        return server.apply(params["server"], h)

    def apply(params, x, *, train=False, rng=None):
        return server.apply(params["server"], features(params, x, train=train, rng=rng),
                            train=train, rng=rng)

    return GKTPair(init=init, apply=apply, features=features, head=head, loss=client.loss,
                   name=name, client=client, server=server)


def gkt_pair(num_classes: int, *, client_channels: int = 8, server_channels: Sequence[int] = (32,),
             hidden: int = 128) -> GKTPair:
    """`gkt_client` and `gkt_server` as the one large model f_s o f_e (module docstring)."""
    return pair(gkt_client(num_classes, channels=client_channels),
                gkt_server(num_classes, channels=server_channels, hidden=hidden))
