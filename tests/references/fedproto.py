"""FedProto (Tan et al., AAAI 2022, Algorithm 1), round 1 from the initial state in numpy: client i
minimizes CE(F_i(x), y) + lam sum_j ||f_i(x)_j - C^(j)||^2 with local SGD (+ momentum) on its own
model; in round 1 there are no global prototypes C^(j) yet (no class has a holder), so the
prototype term is absent and each sampled client runs plain local SGD from its own row; the other
rows are untouched. (The prototype term from round 2 on is checked in tests/test_fedproto.py's
two-round reference with three architectures.)"""
import numpy as np

from tests.references._common import participation, softmax_grads


def fedproto(alg, data, state, key):
    import jax.numpy as jnp
    rows = alg.client_params(state, jnp.arange(data.num_clients))
    K = np.array(rows["Dense_0"]["kernel"], np.float64)
    B = np.array(rows["Dense_0"]["bias"], np.float64)
    part = participation(alg, data, key)
    x, y = np.asarray(data.x, np.float64), np.asarray(data.y)
    lr, m = alg.setup.client_opt.lr, alg.setup.client_opt.momentum
    for c, i in enumerate(part["ids"]):                # reference loop over clients
        W, b = K[i].copy(), B[i].copy()
        vW, vb = np.zeros_like(W), np.zeros_like(b)
        for s in np.flatnonzero(part["mask"][c]):
            gW, gb = softmax_grads(W, b, x[part["idx"][c, s]], y[part["idx"][c, s]])
            vW, vb = gW + m * vW, gb + m * vb
            W, b = W - lr * vW, b - lr * vb
        K[i], B[i] = W, b
    return {"clients": {"Dense_0": {"bias": B, "kernel": K}}}


REFERENCE = {"fedproto": fedproto}
