"""q-FFL / q-FedAvg (Li, Sanjabi, Beirami, Smith, ICLR 2020), Algorithm 3: client k sends
Delta_k = F_k^q L (w_t - w_bar_k) and h_k = q F_k^{q-1} ||L (w_t - w_bar_k)||^2 + L F_k^q, with
F_k = the mean loss at w_t over the batches of its real steps (+ 1e-10) and w_bar_k its local SGD
model; w <- w_t - sum p_k Delta_k / sum p_k h_k (p_k = 1 under uniform weighting, n_k otherwise,
0 for dropped stragglers and step-less clients); L = 1/lr unless `lipschitz` is given."""
import numpy as np

from tests.references._common import as_logistic, broadcast, client_deltas, logistic


def mean_ce(W, b, x, y):
    z = x @ W + b
    z = z - z.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))


def qffl(alg, data, state, key):
    q, lr = alg.config["q"], alg.setup.client_opt.lr
    L = 1.0 / lr if alg.config["lipschitz"] is None else alg.config["lipschitz"]
    W0, b0 = logistic(alg.global_params(state))
    deltas, weights, part = client_deltas(alg, data, W0, b0, key)
    x, y = np.asarray(data.x, np.float64), np.asarray(data.y)
    sum_dW, sum_db, sum_h = 0.0, 0.0, 0.0
    for c, ((dW, db), p) in enumerate(zip(deltas, weights)):     # reference loop over clients
        if p == 0:
            continue
        steps = part["idx"][c][part["mask"][c]]
        F = np.mean([mean_ce(W0, b0, x[rows], y[rows]) for rows in steps]) + 1e-10
        gW, gb = -L * dW, -L * db                                   # L (w_t - w_bar_k)
        sum_dW, sum_db = sum_dW + p * F ** q * gW, sum_db + p * F ** q * gb
        sum_h += p * (q * F ** (q - 1) * (np.sum(gW ** 2) + np.sum(gb ** 2)) + L * F ** q)
    out = as_logistic(W0 - sum_dW / sum_h, b0 - sum_db / sum_h)
    return {"global": out, "clients": broadcast(out, data.num_clients)}


REFERENCE = {"qffl": qffl}
