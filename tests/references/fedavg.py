"""FedAvg (McMahan et al. 2017) and FedOpt (Reddi et al., ICLR 2021, Algorithm 2), from the papers.

    Delta_t = sum_k p_k (w_k - w_t) / sum_k p_k          (w_k: local SGD from w_t, p_k = n_k)
    FedAvg / FedOpt(SGD): w_{t+1} = w_t + eta Delta_t            (FedAvg: eta = 1)
    FedAvgM (Hsu et al. 2019): v_t = rho v_{t-1} + Delta_t, w_{t+1} = w_t + eta v_t  (v_{-1} = 0)
    FedAdam / FedYogi / FedAdagrad: m_t = b1 m_{t-1} + (1 - b1) Delta_t,
        v_t = b2 v_{t-1} + (1 - b2) Delta^2            (Adam)
        v_t = v_{t-1} - (1 - b2) Delta^2 sign(v_{t-1} - Delta^2)   (Yogi)
        v_t = v_{t-1} + Delta^2                        (Adagrad)
        w_{t+1} = w_t + eta m_t / (sqrt(v_t) + tau),  m_{-1} = 0, v_{-1} = tau^2, no bias correction.
"""
import numpy as np

from tests.references._common import (as_logistic, broadcast, client_deltas, logistic,
                                      weighted_mean)


def _fedopt(alg, data, state, key):
    params = alg.global_params(state)
    W0, b0 = logistic(params)
    deltas, weights, _ = client_deltas(alg, data, W0, b0, key)
    D = weighted_mean(deltas, weights)
    cfg = alg.config
    eta = cfg["server_lr"]
    kind = cfg["server_optimizer"]
    if kind == "sgd":            # round 1: the momentum buffer starts at 0, so v_0 = Delta_0
        new = [w + eta * d for w, d in zip((W0, b0), D)]
    else:
        b1, b2, tau = cfg["server_b1"], cfg["server_b2"], cfg["server_eps"]
        new = []
        for w, d in zip((W0, b0), D):
            m = (1 - b1) * d
            v = np.full_like(d, tau ** 2)
            if kind == "fedadam":
                v = b2 * v + (1 - b2) * d * d
            elif kind == "fedyogi":
                v = v - (1 - b2) * d * d * np.sign(v - d * d)
            elif kind == "fedadagrad":
                v = v + d * d
            else:
                raise NotImplementedError(kind)
            new.append(w + eta * m / (np.sqrt(v) + tau))
    out = as_logistic(*new)
    return {"global": out, "clients": broadcast(out, data.num_clients)}


REFERENCE = {name: _fedopt for name in ("fedavg", "fedopt", "fedavgm", "fedadam", "fedyogi",
                                        "fedadagrad")}
