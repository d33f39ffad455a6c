"""pFedMe (T. Dinh, Tran, Nguyen, NeurIPS 2020, Algorithm 1) on the logistic model in float64
numpy, client by client: at every real local step, theta starts from w and takes K gradient steps
theta <- theta - personal_lr (grad f(theta; batch) + lam (theta - w)); then w <- w - eta lam
(w - theta). theta of the last real step is the client's row. Server: w + server_lr * beta *
(p-weighted mean of w_i - w), p_k = n_k (or 1), 0 for dropped stragglers and clients without
steps."""
import numpy as np

from tests.references._common import as_logistic, logistic, participation, softmax_grads


def pfedme_round(alg, data, W0, b0, rows, key):
    """(W0, b0) global, rows: list over all clients of (W_theta, b_theta); returns (W, b, rows)."""
    c_opt, s_opt = alg.setup.client_opt, alg.setup.server_opt
    assert (c_opt.name, c_opt.momentum, s_opt.name, s_opt.momentum) == ("sgd", 0.0, "sgd", 0.0)
    lam, K, plr, beta = (alg.config[k] for k in ("lam", "inner_steps", "personal_lr", "beta"))
    eta = c_opt.lr
    part = participation(alg, data, key)
    x, y = np.asarray(data.x, np.float64).reshape(data.x.shape[0], -1), np.asarray(data.y)
    rows = list(rows)
    sums, total = [0.0, 0.0], 0.0
    for c, k in enumerate(part["ids"]):                    # reference loop over clients
        W, b = W0.copy(), b0.copy()
        for s in np.nonzero(part["mask"][c])[0]:
            xb, yb = x[part["idx"][c, s]], y[part["idx"][c, s]]
            tW, tb = W.copy(), b.copy()
            for _ in range(K):
                gW, gb = softmax_grads(tW, tb, xb, yb)
                tW, tb = tW - plr * (gW + lam * (tW - W)), tb - plr * (gb + lam * (tb - b))
            W, b = W - eta * lam * (W - tW), b - eta * lam * (b - tb)
            rows[k] = (tW, tb)
        reported = part["mask"][c].sum() > 0 and not (alg.config["drop_stragglers"]
                                                     and part["is_straggler"][c])
        if reported:
            p = part["num_examples"][c] if alg.setup.cohort.weighting == "examples" else 1.0
            sums = [sums[0] + p * (W - W0), sums[1] + p * (b - b0)]
            total += p
    if total > 0:
        W0, b0 = W0 + s_opt.lr * beta * sums[0] / total, b0 + s_opt.lr * beta * sums[1] / total
    return W0, b0, rows


def pfedme(alg, data, state, key):
    W, b = logistic(alg.global_params(state))
    rows = [(W, b)] * data.num_clients
    W, b, rows = pfedme_round(alg, data, W, b, rows, key)
    return {"global": as_logistic(W, b),
            "clients": as_logistic(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])),
            "rtol": 1e-4, "atol": 1e-5}


REFERENCE = {"pfedme": pfedme}
