"""Ditto (Li et al., ICML 2021, Algorithm 1), one round in numpy, one client at a time:
    personal  v_k <- v_k - eta_p (grad F_k(v_k) + lam (v_k - w_t))      (on the round's batches)
    global    w_k by the global solver's local SGD from w_t (FedAvg; FedProx adds mu (w - w_t))
    server    w_{t+1} = w_t + sum_k p_k (w_k - w_t) / sum_k p_k   (p_k = n_k; dropped stragglers 0)
Ditto splits the round key in three, (k_part, k_train, k_pers): participation is drawn from k_part.
"""
import jax
import numpy as np

from fedjax_lab.core.rounds import participate
from tests.references._common import softmax_grads


def xent(W, b, x, y):
    """Mean softmax cross-entropy of the logits x W + b."""
    z = x @ W + b
    z = z - z.max(1, keepdims=True)
    return np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y])


def ditto_reference(d, state, part, *, lam, mu, lr, plr, drop_stragglers=True,
                    p_idx=None, p_mask=None, malicious=None, attack="none", scale=1.0,
                    aggregator="mean", server=None):
    """Ditto's round in numpy, one client at a time, plain SGD written out.

    Personal steps on (p_idx, p_mask) (default: the global steps' batches and mask); global steps
    on the participation's batches. Attacks as fedjax_lab.attacks documents them: label_flip
    trains the malicious clients (personal and global) on y -> C - 1 - y; sign_flip replaces a
    malicious client's update w_k - w_t by -scale (w_k - w_t). aggregator: "mean" (sum p_k u_k /
    sum p_k) or "median" (coordinate-wise median of the present clients, p_k > 0). server(w, Delta)
    -> w_{t+1}: the server step (default FedAvg's w + Delta). Also returns the round's metrics: data
    losses and full objectives, each the mean over a client's real steps at the step's params
    (local_*: weighted by p_k, personal_*: uniformly over the sampled clients)."""
    ids, idx, mask = (np.asarray(a) for a in (part.ids, part.batches.idx, part.batches.step_mask))
    p_idx, p_mask = (idx, mask) if p_idx is None else (np.asarray(p_idx), np.asarray(p_mask))
    x, y = np.asarray(d.x, np.float64), np.asarray(d.y).copy()
    offsets = np.asarray(d.offsets)
    bad = np.zeros(d.num_clients, bool) if malicious is None else np.asarray(malicious)
    if attack == "label_flip":
        for k in np.flatnonzero(bad):
            y[offsets[k]:offsets[k + 1]] = d.num_classes - 1 - y[offsets[k]:offsets[k + 1]]
    Wt, bt = (np.asarray(state.server.params["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
    V, Vb = (np.array(state.rows["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
    sq = lambda W, b: np.sum((W - Wt) ** 2) + np.sum((b - bt) ** 2)
    losses = {name: [] for name in ("local_loss", "local_objective", "personal_loss",
                                    "personal_objective")}
    p, uWs, ubs = [], [], []
    for c, k in enumerate(ids):
        vW, vb, W, b = V[k].copy(), Vb[k].copy(), Wt.copy(), bt.copy()
        data, obj = [], []
        for s in np.flatnonzero(p_mask[c]):
            xb, yb = x[p_idx[c, s]], y[p_idx[c, s]]
            data.append(xent(vW, vb, xb, yb))
            obj.append(data[-1] + 0.5 * lam * sq(vW, vb))
            gW, gb = softmax_grads(vW, vb, xb, yb)
            vW, vb = vW - plr * (gW + lam * (vW - Wt)), vb - plr * (gb + lam * (vb - bt))
        losses["personal_loss"].append(np.mean(data))
        losses["personal_objective"].append(np.mean(obj))
        data, obj = [], []
        for s in np.flatnonzero(mask[c]):
            xb, yb = x[idx[c, s]], y[idx[c, s]]
            data.append(xent(W, b, xb, yb))
            obj.append(data[-1] + 0.5 * mu * sq(W, b))
            gW, gb = softmax_grads(W, b, xb, yb)
            W, b = W - lr * (gW + mu * (W - Wt)), b - lr * (gb + mu * (b - bt))
        losses["local_loss"].append(np.mean(data))
        losses["local_objective"].append(np.mean(obj))
        V[k], Vb[k] = vW, vb
        uW, ub = W - Wt, b - bt
        if attack == "sign_flip" and bad[k]:
            uW, ub = -scale * uW, -scale * ub
        p_k = float(part.num_examples[c]) * (mask[c].sum() > 0)
        if drop_stragglers and bool(part.is_straggler[c]):
            p_k = 0.0
        p.append(p_k)
        uWs.append(uW)
        ubs.append(ub)
    p, uWs, ubs = np.array(p), np.stack(uWs), np.stack(ubs)
    if aggregator == "mean":
        dW, db = np.tensordot(p, uWs, 1) / p.sum(), np.tensordot(p, ubs, 1) / p.sum()
    else:
        dW, db = np.median(uWs[p > 0], axis=0), np.median(ubs[p > 0], axis=0)
    server = server or (lambda w, delta: w + delta)
    metrics = {name: np.average(v, weights=p if name.startswith("local") else None)
               for name, v in losses.items()}
    return V, Vb, server(Wt, dW), server(bt, db), metrics


def conformance(alg, data, state, key):
    cfg = alg.config
    assert cfg["global_solver"] == "fedavg" and cfg["personal_steps"] is None  # the defaults here
    part = participate(jax.random.split(key, 3)[0], data, alg.setup.cohort, alg.setup.work)
    lr = alg.setup.client_opt.lr
    plr = lr if cfg["personal_lr"] is None else cfg["personal_lr"]
    V, Vb, W, b, _ = ditto_reference(data, state, part, lam=cfg["lam"], mu=0.0, lr=lr, plr=plr,
                                     drop_stragglers=cfg["drop_stragglers"])
    return {"global": {"Dense_0": {"bias": b, "kernel": W}},
            "clients": {"Dense_0": {"bias": Vb, "kernel": V}}}


REFERENCE = {"ditto": conformance}
