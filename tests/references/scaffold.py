"""SCAFFOLD (Karimireddy et al., ICML 2020, Algorithm 1), one round in numpy from the state's x, c
and every client's c_i (rows), one client at a time:
    y_i <- y_i - eta_l (g_i(y_i) - c_i + c)                      K_i local steps from y_i = x
    option II (default): c_i+ = c_i - c + (x - y_i) / (K_i eta_l);  option I: c_i+ = mean g_i(x)
    x <- x + eta_g mean_S (y_i - x),   c <- c + (|S| / N) mean_S (c_i+ - c_i)
The mean is uniform over the reporting clients (the paper's; weighting="uniform" is SCAFFOLD's
default); a client with no step, or a dropped straggler, reports nothing.
From the suite's first state (c = c_i = 0) the round is FedAvg's; the reference still carries
the correction, so it holds from any state."""
import numpy as np

from tests.references._common import (as_logistic, broadcast, logistic, participation,
                                      softmax_grads)


def scaffold(alg, data, state, key):
    cfg = alg.config
    eta_l, eta_g, option = cfg["client_lr"], cfg["server_lr"], cfg["option"]
    assert cfg["server_optimizer"] == "sgd" and cfg.get("server_momentum", 0.0) == 0.0
    uniform = cfg["weighting"] == "uniform"
    drop = cfg["drop_stragglers"]
    W, b = logistic(state.server.params)
    cW, cb = logistic(state.server.extra)
    ciW, cib = logistic(state.rows)
    part = participation(alg, data, key)
    x, y = np.asarray(data.x, np.float64), np.asarray(data.y)
    dys, weights = [], []
    for i, steps, mask, n_i, straggler in zip(part["ids"], part["idx"], part["mask"],
                                              part["num_examples"], part["is_straggler"]):
        if not mask.any() or (drop and straggler):
            continue
        yW, yb = W.copy(), b.copy()
        for rows in steps[mask]:
            gW, gb = softmax_grads(yW, yb, x[rows], y[rows])
            yW, yb = yW - eta_l * (gW - ciW[i] + cW), yb - eta_l * (gb - cib[i] + cb)
        if option == "II":
            K = mask.sum()
            newW, newb = ciW[i] - cW + (W - yW) / (K * eta_l), cib[i] - cb + (b - yb) / (K * eta_l)
        else:
            grads = [softmax_grads(W, b, x[rows], y[rows]) for rows in steps[mask]]
            newW, newb = np.mean([g[0] for g in grads], 0), np.mean([g[1] for g in grads], 0)
        dys.append((yW - W, yb - b, newW - ciW[i], newb - cib[i]))
        weights.append(1.0 if uniform else n_i)
    q = np.asarray(weights) / np.sum(weights)
    mean = [sum(qk * d[j] for qk, d in zip(q, dys)) for j in range(4)]
    out = as_logistic(W + eta_g * mean[0], b + eta_g * mean[1])
    return {"global": out, "clients": broadcast(out, data.num_clients)}


REFERENCE = {"scaffold": scaffold}
