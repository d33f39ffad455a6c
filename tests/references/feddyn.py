"""FedDyn (Acar et al., ICLR 2021, Algorithm 1), one round in numpy from the state's theta, h and
every client's gradient state g_k (rows), one client at a time:
    theta_k: SGD steps on L_k(theta) - <g_k, theta> + alpha/2 ||theta - theta^{t-1}||^2
    h^t = h^{t-1} - alpha (1/m) sum_{k in P_t} (theta_k - theta^{t-1})      (m: all clients)
    theta^t = (1/|P_t|) sum_{k in P_t} theta_k - h^t / alpha
P_t: the sampled clients that report (a client with no step or a dropped straggler is not in it);
the average is the paper's uniform one (FedDyn's default weighting="uniform")."""
import numpy as np

from tests.references._common import (as_logistic, broadcast, logistic, participation,
                                      softmax_grads)


def feddyn(alg, data, state, key):
    cfg = alg.config
    eta, alpha = cfg["client_lr"], cfg["alpha"]
    assert cfg["weighting"] == "uniform" and alpha > 0
    assert cfg["server_optimizer"] == "sgd" and cfg["server_lr"] == 1.0
    W, b = logistic(state.server.params)
    hW, hb = logistic(state.server.extra)
    gW_all, gb_all = logistic(state.rows)
    part = participation(alg, data, key)
    x, y = np.asarray(data.x, np.float64), np.asarray(data.y)
    models = []
    for k, steps, mask, straggler in zip(part["ids"], part["idx"], part["mask"],
                                         part["is_straggler"]):
        if not mask.any() or (cfg["drop_stragglers"] and straggler):
            continue
        tW, tb = W.copy(), b.copy()
        for rows in steps[mask]:
            gW, gb = softmax_grads(tW, tb, x[rows], y[rows])
            tW = tW - eta * (gW - gW_all[k] + alpha * (tW - W))
            tb = tb - eta * (gb - gb_all[k] + alpha * (tb - b))
        models.append((tW, tb))
    m = data.num_clients
    hW = hW - alpha / m * sum(t[0] - W for t in models)
    hb = hb - alpha / m * sum(t[1] - b for t in models)
    out = as_logistic(np.mean([t[0] for t in models], 0) - hW / alpha,
                      np.mean([t[1] for t in models], 0) - hb / alpha)
    return {"global": out, "clients": broadcast(out, data.num_clients)}


REFERENCE = {"feddyn": feddyn}
