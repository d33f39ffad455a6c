"""FedNova (Wang et al., NeurIPS 2020), one round in numpy, one client at a time:
    client i: tau_i local steps v <- rho v + g + mu (y - x), y <- y - eta v from y = x
    x - y_i = eta sum_r a_ir g_r, the coefficient a_ir of step r's gradient counted out step by
    step: sum_{s >= r} rho^(s - r) (momentum), (1 - eta mu)^(tau_i - 1 - r) (proximal)
    x <- x - eta_g tau_eff sum_i p_i (x - y_i) / ||a_i||_1,   p_i = n_i / sum_j n_j
    tau_eff = sum_i p_i ||a_i||_1 ("paper") or sum_i p_i tau_i ("steps").
In epochs mode (SETUP below) tau_i = ceil(n_i / B) differs by client size, so the normalization
matters in the suite's one round."""
import numpy as np

from tests.references._common import (as_logistic, broadcast, logistic, participation,
                                      softmax_grads)


def fednova(alg, data, state, key):
    cfg = alg.config
    eta, eta_g, mu = cfg["client_lr"], cfg["server_lr"], cfg["mu"]
    rho = cfg.get("client_momentum", 0.0)
    assert cfg["server_optimizer"] == "sgd" and cfg.get("server_momentum", 0.0) == 0.0
    W, b = logistic(alg.global_params(state))
    part = participation(alg, data, key)
    x, y = np.asarray(data.x, np.float64), np.asarray(data.y)
    d_sum, p_sum, work_sum = [0.0, 0.0], 0.0, 0.0
    for steps, mask, n_i, straggler in zip(part["idx"], part["mask"], part["num_examples"],
                                           part["is_straggler"]):
        tau = int(mask.sum())
        if tau == 0 or (cfg["drop_stragglers"] and straggler):
            continue
        p_i = n_i if cfg["weighting"] == "examples" else 1.0
        yW, yb = W.copy(), b.copy()
        vW, vb = np.zeros_like(W), np.zeros_like(b)
        for rows in steps[mask]:
            gW, gb = softmax_grads(yW, yb, x[rows], y[rows])
            vW, vb = rho * vW + gW + mu * (yW - W), rho * vb + gb + mu * (yb - b)
            yW, yb = yW - eta * vW, yb - eta * vb
        if mu:
            a = sum((1 - eta * mu) ** (tau - 1 - r) for r in range(tau))
        else:
            a = sum(rho ** (s - r) for r in range(tau) for s in range(r, tau))
        d_sum = [d_sum[0] + p_i * (W - yW) / a, d_sum[1] + p_i * (b - yb) / a]
        p_sum += p_i
        work_sum += p_i * (a if cfg["tau_eff"] == "paper" else tau)
    tau_eff = work_sum / p_sum
    out = as_logistic(W - eta_g * tau_eff * d_sum[0] / p_sum, b - eta_g * tau_eff * d_sum[1] / p_sum)
    return {"global": out, "clients": broadcast(out, data.num_clients)}


REFERENCE = {"fednova": fednova}
SETUP = {"fednova": {"epochs": 1}}
