"""FetchSGD (Rothchild et al., ICML 2020, Algorithm 1) and local top-k with error feedback (its
baseline), one round from the paper, with numpy count sketches (tests/test_compression.py's
NumpyCountSketch on the state's hash seeds) and numpy local SGD.

Client i sends S(g_i), g_i = (w_t - w_i) / eta_c its accumulated gradient; the server
    S_t = sum_i p_i S(g_i);  S_u <- rho S_u + S_t;  S_e <- S_e + eta S_u;
    Delta = Top_k(U(S_e));  S_u, S_e <- S_u, S_e minus S(Delta) on its support;  w <- w - Delta.
Local top-k: client i sends top_k(g_i + e_i) and keeps e_i <- g_i + e_i - sent; the server
steps with SGD + momentum on sum_i p_i sent_i (u <- rho u + mean, w <- w - eta u; u_0 = 0).
Coordinates are ravel_pytree's order (bias, then kernel row-major).
"""
import numpy as np

from tests.references._common import as_logistic, broadcast, local_sgd, logistic, participation
from tests.test_compression import NumpyCountSketch


def _grads(alg, data, state, key):
    part = participation(alg, data, key)
    W0, b0 = logistic(state.params)
    x, y = np.asarray(data.x, np.float64), np.asarray(data.y)
    lr = alg.setup.client_opt.lr
    g = []
    for c in range(part["idx"].shape[0]):              # reference loop over clients
        W, b = local_sgd(W0, b0, x, y, part["idx"][c], part["mask"][c], lr)
        g.append(np.concatenate([(b0 - b), (W0 - W).ravel()]) / lr)
    p = part["num_examples"] if alg.config["weighting"] == "examples" else np.ones(len(g))
    p = np.where(part["mask"].sum(1) > 0, p, 0.0)
    return np.stack(g), p / p.sum(), part, W0, b0


def _unflat(w, W0, b0):
    return as_logistic(w[b0.size:].reshape(W0.shape), w[:b0.size])


def _topk(v, k):
    return np.argsort(-np.abs(v), kind="stable")[:k]


def fetchsgd(alg, data, state, key):
    cfg = alg.config
    assert not cfg["second_round"] and cfg["masking"] == "subtract"   # the defaults written here
    g, p, _, W0, b0 = _grads(alg, data, state, key)
    w = np.concatenate([b0, W0.ravel()])
    rows, cols, k = cfg["sketch_rows"], cfg["sketch_cols"], cfg["k"]
    sk = NumpyCountSketch(np.asarray(state.sketch.seeds), w.size, rows, cols)
    table = sum(p[i] * sk.sketch(g[i]) for i in range(len(g)))
    s_u = table                                        # rho * 0 + S_t in round 1
    s_e = cfg["server_lr"] * s_u
    est = sk.estimate(s_e)
    idx = _topk(est, k)
    w = w.copy()
    w[idx] -= est[idx]
    out = _unflat(w, W0, b0)
    return {"global": out, "clients": broadcast(out, data.num_clients)}


def local_topk(alg, data, state, key):
    cfg = alg.config
    g, p, part, W0, b0 = _grads(alg, data, state, key)
    errors = np.asarray(state.errors, np.float64)
    sent = np.zeros_like(g)
    for i, cid in enumerate(part["ids"]):
        a = g[i] + (errors[cid] if cfg["error_feedback"] else 0.0)
        top = _topk(a, cfg["k"])
        sent[i, top] = a[top]
    w = np.concatenate([b0, W0.ravel()]) - cfg["server_lr"] * (p @ sent)   # u_1 = mean
    out = _unflat(w, W0, b0)
    return {"global": out, "clients": broadcast(out, data.num_clients)}


REFERENCE = {"fetchsgd": fetchsgd, "local_topk": local_topk}
