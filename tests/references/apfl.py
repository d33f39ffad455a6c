"""APFL (Deng, Kamani, Mahdavi 2020, Algorithm 1) on the logistic model in float64 numpy, client by
client: the global copy w_i by plain SGD on f_i (FedAvg's round, n_k-weighted, dropped stragglers
out of the average), and on the same batches v_i <- v_i - eta alpha_i grad f_i(v_bar_i),
alpha_i <- clip(alpha_i - eta <v_i - w_i, grad f_i(v_bar_i)>, 0, 1), v_bar_i = alpha_i v_i +
(1 - alpha_i) w_i, all from the step's old values; every sampled client keeps its (v_i, alpha_i).
Clients deploy alpha_i v_i + (1 - alpha_i) w^{t+1}."""
import numpy as np

from tests.references._common import (as_logistic, client_deltas, logistic, participation,
                                      softmax_grads, weighted_mean)


def apfl_round(alg, data, W, b, rows, key):
    """(W, b) global, rows: list over all clients of (Wv, bv, alpha); returns (W, b, rows)."""
    eta = alg.setup.client_opt.lr
    assert (alg.setup.client_opt.name, alg.setup.client_opt.momentum) == ("sgd", 0.0)
    adaptive = alg.config["adaptive_alpha"]
    part = participation(alg, data, key)
    x, y = np.asarray(data.x, np.float64).reshape(data.x.shape[0], -1), np.asarray(data.y)
    rows = list(rows)
    for c, k in enumerate(part["ids"]):                    # reference loop over clients
        w, v, a = (W.copy(), b.copy()), (rows[k][0].copy(), rows[k][1].copy()), rows[k][2]
        for s in np.nonzero(part["mask"][c])[0]:
            xb, yb = x[part["idx"][c, s]], y[part["idx"][c, s]]
            vbar = (a * v[0] + (1 - a) * w[0], a * v[1] + (1 - a) * w[1])
            gw, gv = softmax_grads(*w, xb, yb), softmax_grads(*vbar, xb, yb)
            g_alpha = np.sum((v[0] - w[0]) * gv[0]) + np.sum((v[1] - w[1]) * gv[1])
            w = (w[0] - eta * gw[0], w[1] - eta * gw[1])
            v = (v[0] - eta * a * gv[0], v[1] - eta * a * gv[1])
            if adaptive:
                a = float(np.clip(a - eta * g_alpha, 0.0, 1.0))
        rows[k] = (v[0], v[1], a)
    deltas, weights, _ = client_deltas(alg, data, W, b, key)
    server_lr = alg.setup.server_opt.lr
    assert alg.setup.server_opt.name == "sgd" and alg.setup.server_opt.momentum == 0.0
    if weights.sum() > 0:
        dW, db = weighted_mean(deltas, weights)
        W, b = W + server_lr * dW, b + server_lr * db
    return W, b, rows


def deployed(W, b, rows):
    return as_logistic(np.stack([a * Wv + (1 - a) * W for Wv, _, a in rows]),
                       np.stack([a * bv + (1 - a) * b for _, bv, a in rows]))


def initial_rows(state):
    v = state.rows["v"]["Dense_0"]
    return [(np.asarray(v["kernel"][k], np.float64), np.asarray(v["bias"][k], np.float64),
             float(state.rows["alpha"][k])) for k in range(v["bias"].shape[0])]


def apfl(alg, data, state, key):
    W, b = logistic(alg.global_params(state))
    rows = initial_rows(state)
    W, b, rows = apfl_round(alg, data, W, b, rows, key)
    return {"global": as_logistic(W, b), "clients": deployed(W, b, rows)}


REFERENCE = {"apfl": apfl}
