"""FedGen (Zhu et al., ICML 2021, Algorithm 1), the users' half of a round in numpy, one client at a
time: each local step on softmax regression adds alpha CE(h(G_w(eps, y_g)), y_g), y_g ~ p_hat, to
the data loss (and latent_beta KL(...) in the code's variant); the server averages w_k. The server's
generator update comes after the aggregation, so round t's global model is the users' half alone.
"""
import jax
import numpy as np

from fedjax_lab.algorithms.fedgen import GEN_STREAM   # the documented stream constant, not code
from tests.references._common import participation, softmax_grads


def np_generator(g, eps, y, num_classes):
    """G_w(eps, y) = W2 relu(W1 [eps, onehot y] + b1) + b2, in numpy."""
    h = np.concatenate([eps, np.eye(num_classes)[y]], 1) @ np.asarray(g["hidden"]["kernel"], np.float64)
    h = np.maximum(h + np.asarray(g["hidden"]["bias"]), 0)
    return h @ np.asarray(g["representation"]["kernel"], np.float64) + np.asarray(g["representation"]["bias"])


def softmax(z):
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def user_reference(d, state, part, key, *, lr, alpha, gen_batch, noise="normal", labels="prior",
                   latent_beta=0.0, weighting="uniform"):
    """The users' half of a FedGen round, one client at a time, plain SGD written out for softmax
    regression (features = x, head = x W + b): each real step adds alpha * CE(G(eps, y_g) W + b,
    y_g), y_g ~ p_hat (or uniform), and latent_beta * KL(softmax(G(eps', y_b) W + b) || softmax(x_b W + b)).
    The random draws follow the documented streams: step rng fold_in(fold_in(k_train, id), s),
    one uniform draw u [B_G (+ B), 1 + noise_dim] from fold_in(rng, GEN_STREAM) (fedgen.draw's
    rule, written out here in numpy)."""
    K = d.num_classes
    NOISE = np.shape(state.generator["hidden"]["kernel"])[0] - K      # G's input: [eps, onehot y]
    x, y = np.asarray(d.x, np.float64), np.asarray(d.y)
    Wt = np.asarray(state.server.params["Dense_0"]["kernel"], np.float64)
    bt = np.asarray(state.server.params["Dense_0"]["bias"], np.float64)
    prior = np.asarray(state.label_prior)
    k_train = jax.random.split(key)[1]
    ids, idx, mask = (np.asarray(a) for a in (part.ids, part.batches.idx, part.batches.step_mask))
    from statistics import NormalDist
    ndtri = np.vectorize(NormalDist().inv_cdf)
    probs = prior if labels == "prior" else np.ones(K)
    cdf = np.cumsum(probs) / probs.sum()

    def draw(k, n):
        """y by the inverse CDF of probs on u[:, 0]; eps = u[:, 1:] or Phi^-1(u[:, 1:])."""
        u = np.asarray(jax.random.uniform(k, (n, 1 + NOISE)), np.float64)
        y_ = np.minimum(np.searchsorted(cdf[:-1], u[:, 0], side="right"),
                        np.flatnonzero(probs > 0)[-1])
        e = u[:, 1:] if noise == "uniform" else ndtri(np.clip(u[:, 1:], 1e-7, 1 - 1e-7))
        return y_, e

    uW, ub, p = [], [], []
    for c, k in enumerate(ids):
        W, b = Wt.copy(), bt.copy()
        ck = jax.random.fold_in(k_train, int(k))
        for s in np.flatnonzero(mask[c]):
            xb, yb = x[idx[c, s]], y[idx[c, s]]
            n_lat = len(yb) if latent_beta else 0
            y_g, eps = draw(jax.random.fold_in(jax.random.fold_in(ck, int(s)), GEN_STREAM),
                            gen_batch + n_lat)
            z = np_generator(state.generator, eps[:gen_batch], y_g[:gen_batch], K)
            gW, gb = softmax_grads(W, b, xb, yb)
            hW, hb = softmax_grads(W, b, z, y_g[:gen_batch])
            gW, gb = gW + alpha * hW, gb + alpha * hb
            if latent_beta:
                z_b = np_generator(state.generator, eps[gen_batch:], yb, K)
                r = softmax(xb @ W + b) - softmax(z_b @ W + b)     # d KL / d logits, target fixed
                gW, gb = gW + latent_beta * xb.T @ r / len(yb), gb + latent_beta * r.mean(0)
            W, b = W - lr * gW, b - lr * gb
        uW.append(W - Wt)
        ub.append(b - bt)
        n_k = float(part.num_examples[c]) if weighting == "examples" else 1.0
        p.append(n_k * (mask[c].sum() > 0))
    p = np.array(p)
    return Wt + np.tensordot(p, np.stack(uW), 1) / p.sum(), bt + np.tensordot(p, np.stack(ub), 1) / p.sum()


def conformance(alg, data, state, key):
    cfg = alg.config
    assert cfg["schedule"] == "constant" and cfg["latent_beta"] == 0.0 and cfg["use_generator"]

    class Part:                                        # the fields user_reference reads
        p = participation(alg, data, key)
        ids, num_examples = p["ids"], p["num_examples"]

        class batches:
            pass
    Part.batches.idx, Part.batches.step_mask = Part.p["idx"], Part.p["mask"]
    W, b = user_reference(data, state, Part, key, lr=alg.setup.client_opt.lr, alpha=cfg["alpha"],
                          gen_batch=cfg["gen_batch_size"], noise=cfg["noise"],
                          labels="prior" if cfg["label_sampling"] == "prior" else "uniform",
                          weighting=cfg["weighting"])
    return {"global": {"Dense_0": {"bias": b, "kernel": W}}, "atol": 2e-5}


REFERENCE = {"fedgen": conformance}
