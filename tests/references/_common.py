"""Plain-numpy pieces shared by the reference rounds (not a reference module: no REFERENCE)."""
from __future__ import annotations

import jax
import numpy as np

from fedjax_lab.core.rounds import participate


def participation(alg, data, key):
    """Which clients, examples and steps the round `alg.round(state, data, key)` trains: the
    skeleton splits the round key into (k_part, k_train) and draws participation from k_part
    (core/skeleton.py). Returns numpy: ids [C], idx [C, S, B], mask [C, S], num_examples [C],
    is_straggler [C], and k_train (a jax key) for references that need the training key."""
    k_part, k_train = jax.random.split(key)
    part = participate(k_part, data, alg.setup.cohort, alg.setup.work)
    return dict(ids=np.asarray(part.ids), idx=np.asarray(part.batches.idx),
                mask=np.asarray(part.batches.step_mask), num_examples=np.asarray(part.num_examples, np.float64),
                is_straggler=np.asarray(part.is_straggler), k_part=k_part, k_train=k_train)


def softmax_grads(W, b, x, y):
    """Gradients (dW, db) of the mean softmax cross-entropy of the logits x W + b."""
    z = x @ W + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return x.T @ p / len(y), p.mean(0)


def logistic(params):
    """(W, b) float64 of a models.logistic params tree."""
    p = params["Dense_0"]
    return np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)


def as_logistic(W, b):
    return {"Dense_0": {"bias": np.asarray(b), "kernel": np.asarray(W)}}


def local_sgd(W, b, x, y, idx, mask, lr, grad_extra=None):
    """Plain SGD over the steps s with mask[s]: w <- w - lr (grad F(w; batch idx[s]) + extra(w))."""
    W, b = W.copy(), b.copy()
    for s in range(idx.shape[0]):
        if not mask[s]:
            continue
        gW, gb = softmax_grads(W, b, x[idx[s]], y[idx[s]])
        if grad_extra is not None:
            eW, eb = grad_extra(W, b)
            gW, gb = gW + eW, gb + eb
        W, b = W - lr * gW, b - lr * gb
    return W, b
