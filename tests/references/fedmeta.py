"""FedMeta (Chen et al. 2018) with MAML, first-order MAML and Meta-SGD, one round one client at a
time: client k adapts theta' = theta - alpha grad L_S(theta) (inner_steps times) on its support set
and sends the meta-gradient of L_Q(theta') on its query set (MAML: through the adaptation;
FOMAML: grad L_Q at theta'; Meta-SGD: w.r.t. (theta, alpha)); the server averages them by n_k and
steps with Adam (first step from zero moments: -eta g / (|g| + eps)). Gradients by jax.grad of the
model's loss, unjitted per client (independent of the algorithm module); the support / query split
is core.meta's (which examples, not how they are used)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.core import meta
from fedjax_lab.core.rounds import sample_ids


def _loss(model, p, x, y):
    return jnp.mean(model.loss(model.apply(p, x, train=True, rng=None), y))


@functools.partial(jax.jit, static_argnums=(0, 1, 7, 8))
def _reference_client(variant, model, w, xs, ys, xq, yq, lr, steps):
    """(meta-gradient, L_Q(theta')) of one client on its materialized support / query sets."""
    def adapted(theta, alpha, stop):
        for _ in range(steps):
            g = jax.grad(_loss, argnums=1)(model, theta, xs, ys)
            g = jax.lax.stop_gradient(g) if stop else g
            theta = jax.tree.map(lambda t, a, g_: t - a * g_, theta, alpha, g)
        return theta
    if variant == "metasgd":
        return jax.value_and_grad(
            lambda w: _loss(model, adapted(w["theta"], w["alpha"], False), xq, yq))(w)[::-1]
    alpha = jax.tree.map(lambda _: lr, w)
    if variant == "fomaml":       # grad L_Q at theta', taken as the gradient at theta
        t = adapted(w, alpha, True)
        return jax.grad(_loss, argnums=1)(model, t, xq, yq), _loss(model, t, xq, yq)
    return jax.value_and_grad(lambda t: _loss(model, adapted(t, alpha, False), xq, yq))(w)[::-1]


def conformance(alg, data, state, key):
    cfg = alg.config
    variant = cfg["algorithm"].split("_", 1)[1]
    model, lr, steps = alg.model, cfg["inner_lr"], cfg["inner_steps"]
    ids = np.asarray(sample_ids(jax.random.split(key)[0], data, alg.setup.cohort))
    support, query = meta.split_support_query(data, cfg["support_fraction"], seed=cfg["split_seed"])
    w = state.params
    grads, weights = [], []
    for k in ids:                                      # reference loop over clients
        xs, ys = support.client(int(k))
        xq, yq = query.client(int(k))
        g, _ = _reference_client(variant, model, w, xs, ys, xq, yq, lr, steps)
        grads.append(g)
        weights.append(float(data.client_sizes[k]))
    p = np.array(weights) / np.sum(weights)
    mean_g = jax.tree.map(lambda *g: sum(pi * np.asarray(gi, np.float64) for pi, gi in zip(p, g)),
                          *grads)
    assert alg.setup.server_opt.name == "adam"
    eta, eps = alg.setup.server_opt.lr, 1e-8
    new = jax.tree.map(lambda w_, g: np.asarray(w_, np.float64) - eta * g / (np.abs(g) + eps),
                       w, mean_g)
    glob = new["theta"] if variant == "metasgd" else new
    return {"global": glob, "rtol": 1e-4}


REFERENCE = {f"fedmeta_{v}": conformance for v in ("maml", "fomaml", "metasgd")}
