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


def client_deltas(alg, data, W0, b0, key, *, lr=None, grad_extra=None):
    """Local SGD of each sampled client from (W0, b0), one after another: the list of
    (W_k - W0, b_k - b0) and the FedAvg weights p_k (n_k, or 1 for weighting="uniform"; 0 for a
    client with no steps, or a straggler when the algorithm drops them)."""
    part = participation(alg, data, key)
    lr = alg.setup.client_opt.lr if lr is None else lr
    x, y = np.asarray(data.x, np.float64), np.asarray(data.y)
    deltas, weights = [], []
    drop = alg.config.get("drop_stragglers", False)
    for c in range(part["idx"].shape[0]):              # reference loop over clients
        extra = None if grad_extra is None else (lambda W, b: grad_extra(W, b, W0, b0))
        W, b = local_sgd(W0, b0, x, y, part["idx"][c], part["mask"][c], lr, extra)
        deltas.append((W - W0, b - b0))
        p = part["num_examples"][c] if alg.config.get("weighting", "examples") == "examples" else 1.0
        if part["mask"][c].sum() == 0 or (drop and part["is_straggler"][c]):
            p = 0.0
        weights.append(p)
    return deltas, np.asarray(weights), part


def weighted_mean(deltas, weights):
    q = weights / weights.sum()
    return (sum(qk * d[0] for qk, d in zip(q, deltas)), sum(qk * d[1] for qk, d in zip(q, deltas)))


def broadcast(params, n):
    """A global model as every client's deployed model, stacked [n, ...]."""
    return {k: {kk: np.broadcast_to(v, (n,) + np.shape(v)) for kk, v in d.items()}
            for k, d in params.items()}
