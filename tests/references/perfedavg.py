"""Per-FedAvg (Fallah et al., NeurIPS 2020, Algorithm 1), one round in numpy, one client at a time.
Each local step draws D, D', D'' (thirds of a batch of 3B rows) and steps on w (not on w~):
    w~ = w - alpha grad f(w, D)
    FO: w <- w - beta grad f(w~, D')
    HF: w <- w - beta (I - alpha H(w, D'')) grad f(w~, D'),  H v by central differences with delta
    (exact: the exact Hessian-vector product); the server takes the uniform mean of w_k - w_t.
"""
import dataclasses

import jax
import numpy as np

from fedjax_lab.core.rounds import participate
from tests.references._common import broadcast, softmax_grads


def xent(W, b, x, y):
    z = x @ W + b
    z = z - z.max(1, keepdims=True)
    return np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y])


def softmax_hvp(W, b, x, y, VW, Vb):
    """Exact Hessian-vector product of the mean softmax cross-entropy of x W + b with (VW, Vb):
    dz = x VW + Vb, dp = (diag(p) - p p^T) dz per example, H v = (x^T dp / B, mean dp)."""
    z = x @ W + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = x @ VW + Vb
    dp = p * dz - p * np.sum(p * dz, axis=1, keepdims=True)
    return x.T @ dp / len(y), dp.mean(0)


def per_fedavg_reference(d, w_t, part, *, variant, alpha, beta, delta, B, drop_stragglers=True):
    """One Per-FedAvg round in numpy, one client at a time: every real step s of client c splits
    its 3B rows into D, D', D'' and applies the paper's rule to w (not to w~); the server takes the
    uniform mean of w_k - w_t over the clients it keeps. Also returns local_loss: the mean over
    clients of the mean over steps of f(w~, D')."""
    x, y = np.asarray(d.x, np.float64), np.asarray(d.y)
    ids, idx, mask = (np.asarray(a) for a in (part.ids, part.batches.idx, part.batches.step_mask))
    Wt, bt = (np.asarray(w_t["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
    deltas, p, losses = [], [], []
    for c in range(len(ids)):
        W, b = Wt.copy(), bt.copy()
        step_losses = []
        for s in np.flatnonzero(mask[c]):
            rows = idx[c, s]
            (x1, x2, x3), (y1, y2, y3) = (np.split(a[rows], 3) for a in (x, y))
            g0W, g0b = softmax_grads(W, b, x1, y1)
            aW, ab = W - alpha * g0W, b - alpha * g0b                      # w~
            step_losses.append(xent(aW, ab, x2, y2))
            gW, gb = softmax_grads(aW, ab, x2, y2)
            if variant == "fo":
                dW, db = gW, gb
            elif variant == "hf":
                pW, pb = softmax_grads(W + delta * gW, b + delta * gb, x3, y3)
                mW, mb = softmax_grads(W - delta * gW, b - delta * gb, x3, y3)
                dW, db = gW - alpha * (pW - mW) / (2 * delta), gb - alpha * (pb - mb) / (2 * delta)
            else:
                hW, hb = softmax_hvp(W, b, x3, y3, gW, gb)
                dW, db = gW - alpha * hW, gb - alpha * hb
            W, b = W - beta * dW, b - beta * db                            # the step is on w
        deltas.append((W - Wt, b - bt))
        losses.append(np.mean(step_losses))
        keep = mask[c].any() and not (drop_stragglers and bool(part.is_straggler[c]))
        p.append(1.0 if keep else 0.0)
    p = np.array(p)
    mean = lambda i: sum(pk * dl[i] for pk, dl in zip(p, deltas)) / p.sum()
    return Wt + mean(0), bt + mean(1), float(np.average(losses, weights=p))


def conformance(alg, data, state, key):
    cfg = alg.config
    B = alg.setup.work.batch_size
    work = dataclasses.replace(alg.setup.work, batch_size=3 * B)   # the step's 3B rows, in thirds
    part = participate(jax.random.split(key)[0], data, alg.setup.cohort, work)
    variant = "fo" if cfg["algorithm"] == "perfedavg_fo" else (
        "exact" if cfg.get("hessian") == "exact" else "hf")
    W, b, _ = per_fedavg_reference(data, state.params, part, variant=variant,
                                   alpha=cfg["inner_lr"], beta=alg.setup.client_opt.lr,
                                   delta=cfg.get("hvp_delta", 0.0), B=B,
                                   drop_stragglers=cfg["drop_stragglers"])
    out = {"Dense_0": {"bias": b, "kernel": W}}
    return {"global": out, "clients": broadcast(out, data.num_clients)}


REFERENCE = {"perfedavg_fo": conformance, "perfedavg_hf": conformance}
