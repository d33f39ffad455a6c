"""FedBN (Li et al., ICLR 2021, Algorithm 1) on the MLP with BatchNorm, client by client: client k
trains (w_t shared, its own BatchNorm layers b_k) by SGD, where each step normalizes by the batch
(mean, biased variance, eps 1e-5) and moves the running statistics by 0.9 old + 0.1 batch; it
sends the shared part, and the server averages it by n_k. The network's forward pass is written
out here (x W + b -> BN -> ReLU per hidden layer, then x W + b); gradients by jax.grad, unjitted."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tests.references._common import participation

EPS, MOMENTUM = 1e-5, 0.9
MODEL = {"fedbn": "mlp_bn"}


def _hidden(p):
    return sorted(k for k in p["params"] if k.startswith("hidden_layers_"))


def forward(p, x, *, train):
    """logits and each BatchNorm layer's batch (mean, var) of the MLP-BN, written out."""
    z, stats = x.reshape(x.shape[0], -1), []
    for i, name in enumerate(_hidden(p)):
        h = z @ p["params"][name]["kernel"] + p["params"][name]["bias"]
        norm = p["params"][f"norms_{i}"]
        if train:
            mean, var = h.mean(0), (h * h).mean(0) - h.mean(0) ** 2
        else:
            mean, var = p["batch_stats"][f"norms_{i}"]["mean"], p["batch_stats"][f"norms_{i}"]["var"]
        stats.append((mean, var))
        z = jax.nn.relu((h - mean) / jnp.sqrt(var + EPS) * norm["scale"] + norm["bias"])
    return z @ p["params"]["out"]["kernel"] + p["params"]["out"]["bias"], stats


def loss(p, x, y):
    logits = forward(p, x, train=True)[0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[jnp.arange(len(y)), y])


def is_local(name):
    return name.startswith("norms_")


def start(w, row):
    """(w_t shared, b_k): b_k = {"params": {norms_i: ...}, "batch_stats": {...}}."""
    return {"params": {k: (row["params"][k] if is_local(k) else v) for k, v in w["params"].items()},
            "batch_stats": row["batch_stats"]}


def local_part(p):
    return {"params": {k: v for k, v in p["params"].items() if is_local(k)},
            "batch_stats": p["batch_stats"]}


def fedbn_round(alg, data, w, rows, key):
    """One round from global params w and rows (lists of per-client b_k, numpy trees); returns
    (w, rows) after it. Computed in float64 (BatchNorm's 1/sqrt(var + eps) magnifies float32
    rounding on small batches)."""
    part = participation(alg, data, key)
    with jax.enable_x64(True):
        w, rows = _round64(alg, data, w, rows, part)
    return jax.tree.map(lambda a: np.asarray(a, np.float32), (w, rows))


def _round64(alg, data, w, rows, part):
    w, rows = jax.tree.map(lambda a: np.asarray(a, np.float64), (w, rows))
    lr = alg.setup.client_opt.lr
    x, y = np.asarray(data.x, np.float64), np.asarray(data.y)
    grad = jax.grad(loss)
    rows = list(rows)
    sums, total = None, 0.0
    for c, k in enumerate(part["ids"]):                    # reference loop over clients
        p = start(w, rows[k])
        for s in np.nonzero(part["mask"][c])[0]:
            xb, yb = x[part["idx"][c, s]], y[part["idx"][c, s]]
            g = grad(p, xb, yb)
            batch = forward(p, xb, train=True)[1]
            new = jax.tree.map(lambda a, b: a - lr * b, p["params"], g["params"])
            stats = {f"norms_{i}": {"mean": MOMENTUM * p["batch_stats"][f"norms_{i}"]["mean"]
                                    + (1 - MOMENTUM) * m,
                                    "var": MOMENTUM * p["batch_stats"][f"norms_{i}"]["var"]
                                    + (1 - MOMENTUM) * v} for i, (m, v) in enumerate(batch)}
            p = {"params": new, "batch_stats": stats}
        reported = part["mask"][c].sum() > 0 and not (alg.config["drop_stragglers"]
                                                     and part["is_straggler"][c])
        if not reported:
            continue
        rows[k] = local_part(p)
        n_k = part["num_examples"][c] if alg.setup.cohort.weighting == "examples" else 1.0
        delta = {k2: jax.tree.map(lambda a, b: n_k * (np.asarray(a) - np.asarray(b)), p["params"][k2],
                                  w["params"][k2]) for k2 in w["params"] if not is_local(k2)}
        sums = delta if sums is None else jax.tree.map(np.add, sums, delta)
        total += n_k
    params = {k: (jax.tree.map(lambda a, d: np.asarray(a) + d / total, v, sums[k])
                  if not is_local(k) and total > 0 else v) for k, v in w["params"].items()}
    return {"params": params, "batch_stats": w["batch_stats"]}, rows


def fedbn(alg, data, state, key):
    w = jax.tree.map(np.asarray, alg.global_params(state))
    rows = [local_part(w)] * data.num_clients
    w, rows = fedbn_round(alg, data, w, rows, key)
    clients = [start(w, r) for r in rows]
    return {"global": w, "clients": jax.tree.map(lambda *a: np.stack(a), *clients),
            "rtol": 1e-4, "atol": 1e-5}


REFERENCE = {"fedbn": fedbn}
