"""IFCA (Ghosh et al., NeurIPS 2020, Algorithm 2, model averaging) on the logistic model in float64
numpy, client by client: client i's cluster j^ = argmin_j of its mean batch loss over the batches of
its real steps under theta_j (first on ties), plain SGD from theta_j^, and per cluster theta_j +
server_lr * (p-weighted mean of the updates of the clients that chose j); p_i = n_i (or 1), 0 for
dropped stragglers and clients without steps. Rows: each trained client's j^; clients deploy
theta of their row."""
import numpy as np

from tests.references._common import as_logistic, local_sgd, participation


def mean_ce(W, b, x, y):
    z = x @ W + b
    z = z - z.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))


def ifca_round(alg, data, thetas, rows, key):
    """thetas: list over clusters of (W, b); rows: [N] cluster ids. Returns (thetas, rows)."""
    c_opt, s_opt = alg.setup.client_opt, alg.setup.server_opt
    assert (c_opt.name, c_opt.momentum, s_opt.name, s_opt.momentum) == ("sgd", 0.0, "sgd", 0.0)
    part = participation(alg, data, key)
    x, y = np.asarray(data.x, np.float64).reshape(data.x.shape[0], -1), np.asarray(data.y)
    k = len(thetas)
    sums = [[0.0, 0.0] for _ in range(k)]
    totals = np.zeros(k)
    rows = np.array(rows)
    for c, i in enumerate(part["ids"]):                    # reference loop over clients
        steps = np.nonzero(part["mask"][c])[0]
        if steps.size == 0:
            continue
        batches = [(x[part["idx"][c, s]], y[part["idx"][c, s]]) for s in steps]
        losses = [np.mean([mean_ce(W, b, xb, yb) for xb, yb in batches]) for W, b in thetas]
        j = int(np.argmin(losses))
        rows[i] = j
        W, b = local_sgd(*thetas[j], x, y, part["idx"][c], part["mask"][c], c_opt.lr)
        if alg.config["drop_stragglers"] and part["is_straggler"][c]:
            continue
        p = part["num_examples"][c] if alg.setup.cohort.weighting == "examples" else 1.0
        sums[j] = [sums[j][0] + p * (W - thetas[j][0]), sums[j][1] + p * (b - thetas[j][1])]
        totals[j] += p
    thetas = [(W + s_opt.lr * sums[j][0] / totals[j], b + s_opt.lr * sums[j][1] / totals[j])
              if totals[j] > 0 else (W, b) for j, (W, b) in enumerate(thetas)]
    return thetas, rows


def clusters_of(state):
    p = state.server.params["Dense_0"]
    return [(np.asarray(p["kernel"][j], np.float64), np.asarray(p["bias"][j], np.float64))
            for j in range(p["bias"].shape[0])]


def deployed(thetas, rows):
    return as_logistic(np.stack([thetas[j][0] for j in rows]),
                       np.stack([thetas[j][1] for j in rows]))


def ifca(alg, data, state, key):
    thetas, rows = ifca_round(alg, data, clusters_of(state), np.asarray(state.rows), key)
    return {"clients": deployed(thetas, rows)}


REFERENCE = {"ifca": ifca}
