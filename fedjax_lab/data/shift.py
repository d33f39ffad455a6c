"""Feature shift across clients (FedBN's non-iid setting, Li et al., ICLR 2021): the same task,
clients drawn from K domains whose inputs differ.

Client k belongs to domain d = k mod K, and every input of domain d (train and test) becomes

    x' = a_d * x + b_d * s        a_d = exp(u_d), u_d ~ U[-log 3, log 3];  b_d ~ N(0, 1)

with s the standard deviation of all inputs: contrast and brightness change per domain, the
labels do not. Domain 0 keeps the original inputs. FedBN's own domains (MNIST, SVHN, USPS,
SynthDigits, MNIST-M) are different datasets; an affine change per domain is the shift that
BatchNorm's per-domain statistics can undo exactly, which is what the method claims to exploit.
`load("digits:shards=2,clients=20,domains=4")` applies it after the partition.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from fedjax_lab.core import validate


def domain_transforms(num_domains: int, *, seed: int = 0):
    """(a [K], b [K]): each domain's contrast and brightness (domain 0: a = 1, b = 0)."""
    rng = np.random.default_rng(seed)
    a = np.exp(rng.uniform(-np.log(3.0), np.log(3.0), num_domains))
    b = rng.normal(0.0, 1.0, num_domains)
    a[0], b[0] = 1.0, 0.0
    return a.astype(np.float32), b.astype(np.float32)


def feature_shift(data, num_domains: int, *, seed: int = 0):
    """`data` with client k's inputs (train and test) moved to domain k mod num_domains."""
    validate.positive("domains", num_domains, integer=True)
    a, b = domain_transforms(num_domains, seed=seed)
    s = float(jnp.std(data.x))

    def shift(split):
        d = split.client_ids() % num_domains
        scale = jnp.asarray(a)[d].reshape((-1,) + (1,) * (split.x.ndim - 1))
        offset = jnp.asarray(b)[d].reshape(scale.shape) * s
        return dataclasses.replace(split, x=(split.x * scale + offset).astype(split.x.dtype))

    test = None if data.test is None else shift(data.test)
    return dataclasses.replace(shift(data), test=test)


def domain_of(data, num_domains: int):
    """[N] each client's domain."""
    return np.arange(data.num_clients) % num_domains
