"""signSGD with majority vote (Bernstein et al. 2019), medianSGD (Yin et al. 2018) and their noisy
versions (Chen et al., NeurIPS 2020), from the papers: client k runs local SGD from x_t and sends
g_k = (x_t - x_k) / eta_c (its accumulated gradient), perturbed as g_k + sigma xi_k (xi ~ N(0, I) or
U[-1, 1]^d, drawn as uplink.py's `perturb` docstring specifies the stream); signSGD sends
sign(g_k + sigma xi_k) and the server steps x_{t+1} = x_t - delta sign(sum_k sign(.)) (majority) or
- delta mean_k sign(.) (mean vote); medianSGD steps x_{t+1} = x_t - delta median_k(g_k + sigma xi_k)."""
import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import norm

from fedjax_lab import attacks
from fedjax_lab.core.rounds import participate
from fedjax_lab.uplink import NOISE_STREAM
from tests.references._common import as_logistic, broadcast, softmax_grads


def _documented_noise(tree, key, client_id, noise):
    """xi for one client, drawn as `perturb`'s docstring says the round draws it (the stream's
    contract, written out here rather than taken from the implementation)."""
    k = jax.random.fold_in(jax.random.fold_in(key, NOISE_STREAM), client_id)
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(k, len(leaves))
    draw = ((lambda k, x: jax.random.normal(k, x.shape, jnp.float32)) if noise == "gaussian" else
            (lambda k, x: jax.random.uniform(k, x.shape, jnp.float32, -1.0, 1.0)))
    return jax.tree.unflatten(treedef, [np.asarray(draw(k, x), np.float64) for k, x in zip(keys, leaves)])


def _reference_round(data, state, key, *, rule, vote, noise, sigma, server_lr, local_steps,
                     client_lr, setup, aggregator=None, attack=None, fraction=0.0, scale=None):
    """Unjitted, no vmap: one client after another; numpy gradients, numpy sign / median.

    Attackers replace what they send (the signs for signSGD); the server reads a signSGD message
    by its signs. `aggregator` "trimmed_mean" (beta 0.25) replaces the vote / median."""
    k_part, _ = jax.random.split(key)
    part = jax.jit(participate, static_argnums=(2, 3))(k_part, data, setup.cohort, setup.work)
    W0 = np.asarray(state.params["Dense_0"]["kernel"], np.float64)
    b0 = np.asarray(state.params["Dense_0"]["bias"], np.float64)
    x, y = np.asarray(data.x, np.float64), np.asarray(data.y)
    idx, mask, ids = np.asarray(part.batches.idx), np.asarray(part.batches.step_mask), np.asarray(part.ids)
    msgs_W, msgs_b = [], []
    for c in range(len(ids)):                                  # reference loop over clients
        W, b = W0.copy(), b0.copy()
        for s in range(local_steps):
            if mask[c, s]:
                gW, gb = softmax_grads(W, b, x[idx[c, s]], y[idx[c, s]])
                W, b = W - client_lr * gW, b - client_lr * gb
        gW, gb = (W0 - W) / client_lr, (b0 - b) / client_lr
        if sigma > 0:
            xi = _documented_noise(state.params, key, int(ids[c]), noise)["Dense_0"]
            gW, gb = gW + sigma * xi["kernel"], gb + sigma * xi["bias"]
        msgs_W.append(gW)
        msgs_b.append(gb)
    bad = (np.asarray(attacks.malicious_clients(data.num_clients, fraction))[ids] if attack
           else np.zeros(len(ids), bool))
    out = []
    for msgs in (msgs_W, msgs_b):
        M = np.stack(msgs)
        if rule == "sign":
            M = np.sign(M)                                     # what an honest node sends
        if attack == "sign_flip":
            M[bad] = -M[bad]
        elif attack == "scaled":
            M[bad] = scale * M[bad]
        elif attack == "alie":                                 # Baruch et al. over the honest sends
            n, f = len(ids), bad.sum()
            z = norm.ppf((n - (np.floor(n / 2 + 1) - f)) / n)
            M[bad] = M[~bad].mean(0) - z * M[~bad].std(0)
        if rule == "sign":
            M = np.sign(M)                                     # 1 bit a coordinate is all that arrives
        if aggregator == "trimmed_mean":
            k = int(np.floor(0.25 * len(M)))
            d = np.sort(M, axis=0)[k:len(M) - k].mean(0)
        elif rule == "median":
            d = np.median(M, axis=0)
        elif vote == "majority":
            d = np.sign(M.sum(0))
        else:
            d = M.mean(0)
        out.append(d)
    return W0 - server_lr * out[0], b0 - server_lr * out[1], bad.sum()


def conformance(alg, data, state, key):
    """The registered names with their defaults (signSGD's vote and sigma from alg.config)."""
    cfg = alg.config
    rule = "sign" if cfg["aggregator"] == "sign" else "median"
    W, b, _ = _reference_round(data, state, key, rule=rule, vote=cfg.get("vote", "majority"),
                               noise=cfg["noise"], sigma=cfg["sigma"], server_lr=cfg["server_lr"],
                               local_steps=alg.setup.work.local_steps,
                               client_lr=alg.setup.client_opt.lr, setup=alg.setup)
    out = as_logistic(W, b)
    return {"global": out, "clients": broadcast(out, data.num_clients)}


REFERENCE = {name: conformance for name in ("signsgd", "noisy_signsgd", "mediansgd", "noisy_mediansgd")}
