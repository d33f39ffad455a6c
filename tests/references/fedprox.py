"""FedProx (Li et al., MLSys 2020): client k runs SGD on h_k(w; w_t) = F_k(w) + mu/2 ||w - w_t||^2,
so each step adds mu (w - w_t) to the gradient; stragglers keep their partial work; the server
averages w_k by n_k (w_{t+1} = sum_k n_k w_k / sum_k n_k)."""
from tests.references._common import (as_logistic, broadcast, client_deltas, logistic,
                                      weighted_mean)


def fedprox(alg, data, state, key):
    mu = alg.config["mu"]
    W0, b0 = logistic(alg.global_params(state))
    prox = lambda W, b, W0, b0: (mu * (W - W0), mu * (b - b0))
    deltas, weights, _ = client_deltas(alg, data, W0, b0, key, grad_extra=prox)
    dW, db = weighted_mean(deltas, weights)
    out = as_logistic(W0 + dW, b0 + db)
    return {"global": out, "clients": broadcast(out, data.num_clients)}


REFERENCE = {"fedprox": fedprox}
