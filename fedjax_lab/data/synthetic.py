"""Synthetic(alpha, beta) of the FedProx paper (Li et al., MLSys 2020, Sec. 5.1).

For client k:
    u_k ~ N(0, alpha),  W_k ~ N(u_k, 1) [dim x classes],  b_k ~ N(u_k, 1) [classes]
    B_k ~ N(0, beta),   v_k ~ N(B_k, 1) [dim]
    x ~ N(v_k, Sigma),  Sigma diagonal with Sigma_jj = j^-1.2
    y = argmax softmax(W_k^T x + b_k)
alpha controls how much the local models differ, beta how much the local inputs differ.
Synthetic-IID: one W, b ~ N(0, 1) for all clients and x ~ N(0, Sigma) everywhere.

Choices where paper and its public generator (`data/synthetic_*/generate_niid.py`) differ or are silent:
  * The generator draws N(0, alpha) with `np.random.normal(0, alpha)`, i.e. alpha (and beta) is the
    *standard deviation*; the paper writes N(0, alpha). We follow the code (identical at alpha = 1).
  * Client sizes: the generator's `lognormal(4, 2) + 50` (power law, at least 50), which the paper
    only calls "power law". `mean_size`/`sigma_size`/`min_size` expose it.
  * Each client's examples are split 90% train / 10% test as in the generator.
  * A consequence of the model worth knowing: u_k is a common mean of all entries of W_k and b_k,
    so it adds u_k * (sum_j x_j + 1) to *every* logit and never changes the argmax. alpha therefore
    does not change the labels (given the same draws); local models differ through the N(., 1)
    draws around u_k. We keep the generator's definition (the benchmark is defined by it).
  * Random numbers come from numpy's PCG64 with `seed`, so the values are not the generator's,
    only their distribution.
"""
from __future__ import annotations

import numpy as np

from fedjax_lab.data.federated import FederatedArrays, split_clients


def synthetic(alpha: float = 1.0, beta: float = 1.0, *, iid: bool = False, num_clients: int = 30,
              dim: int = 60, num_classes: int = 10, seed: int = 0, test_fraction: float = 0.1,
              mean_size: float = 4.0, sigma_size: float = 2.0, min_size: int = 50,
              max_size: int | None = None) -> FederatedArrays:
    """FedProx's Synthetic(alpha, beta) (or Synthetic-IID with `iid=True`) as FederatedArrays."""
    for name, v in (("alpha", alpha), ("beta", beta)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0 (a standard deviation), got {v}")
    for name, v in (("num_clients", num_clients), ("dim", dim), ("num_classes", num_classes)):
        if v <= 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(mean_size, sigma_size, num_clients).astype(np.int64) + min_size
    if max_size is not None:
        sizes = np.minimum(sizes, max_size)
    owner = np.repeat(np.arange(num_clients), sizes)
    sigma_diag = np.arange(1, dim + 1, dtype=np.float64) ** -1.2

    if iid:
        W = np.broadcast_to(rng.normal(0, 1, (dim, num_classes)), (num_clients, dim, num_classes))
        b = np.broadcast_to(rng.normal(0, 1, num_classes), (num_clients, num_classes))
        v = np.zeros((num_clients, dim))
    else:
        u = rng.normal(0, alpha, num_clients)
        B = rng.normal(0, beta, num_clients)
        v = rng.normal(B[:, None], 1, (num_clients, dim))
        W = rng.normal(u[:, None, None], 1, (num_clients, dim, num_classes))
        b = rng.normal(u[:, None], 1, (num_clients, num_classes))

    x = v[owner] + rng.standard_normal((owner.shape[0], dim)) * np.sqrt(sigma_diag)
    logits = np.empty((owner.shape[0], num_classes))
    chunk = 1 << 15
    for lo in range(0, owner.shape[0], chunk):   # bounded memory for W[owner]
        o = owner[lo:lo + chunk]
        logits[lo:lo + chunk] = np.einsum("nd,ndk->nk", x[lo:lo + chunk], W[o]) + b[o]
    y = np.argmax(logits, axis=1)
    return split_clients(x.astype(np.float32), y, owner, num_clients, test_fraction=test_fraction,
                         seed=seed + 1, num_classes=num_classes)
