"""MOON (algorithms/moon.py): a per-client reference loop with the contrastive loss written out,
mu = 0 is FedAvg, the contrastive term does what the paper says, bad input."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lab as fl
from fedjax_lab.algorithms import fedavg, moon
from fedjax_lab.core.rounds import participate

HIDDEN = (5,)


def mlp_features(p, x):
    h = p["hidden_layers_0"]
    return jnp.maximum(x.reshape(x.shape[0], -1) @ h["kernel"] + h["bias"], 0.0)


def reference_loss(w, w_glob, w_prev, x, y, mu, tau):
    """CE + mu l_con of Li et al. (2021), Sec. 3.3, for the one-hidden-layer MLP written by hand."""
    z, z_glob, z_prev = mlp_features(w, x), mlp_features(w_glob, x), mlp_features(w_prev, x)
    logits = z @ w["out"]["kernel"] + w["out"]["bias"]
    ce = jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[jnp.arange(len(y)), y])
    norm = lambda v: jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=1), 1e-16))   # max(||v||, 1e-8), no
    # NaN gradient at a dead-ReLU (all zero) representation
    sim = lambda a, b: jnp.sum(a * b, axis=1) / (norm(a) * norm(b))
    pos, neg = jnp.exp(sim(z, z_glob) / tau), jnp.exp(sim(z, z_prev) / tau)
    return ce + mu * jnp.mean(-jnp.log(pos / (pos + neg)))


reference_grad = jax.jit(jax.grad(reference_loss))   # jitted for speed: still the loss above


def reference_rounds(data, alg, params, keys, *, lr, mu, tau):
    """Algorithm 1 client by client (jax.grad of the loss above, plain SGD); sampled
    clients, batches and straggler flags from `participate` with the round's key."""
    X, Y = jnp.asarray(data.x), jnp.asarray(data.y)
    w = params
    prev = [params] * data.num_clients
    for key in keys:
        part = participate(jax.random.split(key)[0], data, alg.setup.cohort, alg.setup.work)
        ids, idx = np.asarray(part.ids), np.asarray(part.batches.idx)
        mask, straggler = np.asarray(part.batches.step_mask), np.asarray(part.is_straggler)
        n = np.asarray(part.num_examples, np.float64)
        locals_, weights = [], []
        for i, steps, m, s, n_i in zip(ids, idx, mask, straggler, n):
            if s or not m.any():       # dropped stragglers report nothing and keep their row
                continue
            w_i = w
            for rows in steps[m]:
                g = reference_grad(w_i, w, prev[i], X[rows], Y[rows], mu, tau)
                w_i = jax.tree.map(lambda a, b: a - lr * b, w_i, g)
            locals_.append(w_i)
            weights.append(n_i)
            prev[i] = w_i
        q = np.asarray(weights) / np.sum(weights)
        w = jax.tree.map(lambda *ls: sum(qk * np.asarray(l, np.float64) for qk, l in zip(q, ls)),
                         *locals_)
        w = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), w)
    return w, prev


def test_moon_matches_a_per_client_reference_loop(tiny_data):
    """Four rounds, half the sampled clients straggling (dropped), mu = 2, tau = 0.5: the global
    model and every client's previous model (the rows)."""
    model = fl.models.mlp(3, hidden=HIDDEN)
    setup = fl.Setup.of(clients_per_round=3, local_steps=4, batch_size=3, client_lr=0.3,
                        stragglers=0.5)
    alg = moon(model, mu=2.0, tau=0.5, setup=setup)
    state = alg.init(jax.random.key(0), tiny_data)
    params0 = state.server.params
    keys = [jax.random.key(100 + r) for r in range(4)]
    round_fn = jax.jit(alg.round)
    for key in keys:
        state, metrics = round_fn(state, tiny_data, key)
    w, prev = reference_rounds(tiny_data, alg, params0, keys, lr=0.3, mu=2.0, tau=0.5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 state.server.params, w)
    jax.tree.map(lambda a, *b: np.testing.assert_allclose(a, np.stack(b), rtol=1e-4, atol=1e-5),
                 state.rows, *prev)
    fed = reference_rounds(tiny_data, alg, params0, keys, lr=0.3, mu=0.0, tau=0.5)[0]
    gap = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), w, fed)))
    print("max |MOON - FedAvg| after 4 rounds", gap)
    assert gap > 1e-3
    assert float(metrics["local_objective"]) > float(metrics["local_loss"])   # + mu l_con


def test_mu_zero_is_fedavg(tiny_data):
    """mu = 0 is FedAvg over three rounds, to float rounding (the two are different programs: the
    zero-weighted l_con's graph changes how XLA fuses the supervised gradient; bit for bit under
    XLA's fusion emitters, 5e-9 apart under the elemental ones of the default test run); mu = 1 is
    FedAvg in round 1 (every previous model is w_0 = w_t: l_con has zero gradient) and not
    afterwards."""
    model = fl.models.mlp(3, hidden=HIDDEN)
    flat = dict(clients_per_round=4, local_steps=3, batch_size=4, client_lr=0.3)
    params = {}
    for name, alg in (("off", moon(model, mu=0.0, setup=fl.Setup.of(**flat))),
                      ("on", moon(model, mu=1.0, setup=fl.Setup.of(**flat))),
                      ("avg", fedavg(model, setup=fl.Setup.of(**flat)))):
        state, fn, params[name] = alg.init(jax.random.key(0), tiny_data), jax.jit(alg.round), []
        for r in range(3):
            state = fn(state, tiny_data, jax.random.key(5 + r))[0]
            params[name].append(alg.global_params(state))
    for r in range(3):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
                     params["off"][r], params["avg"][r])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 params["on"][0], params["avg"][0])
    gap = lambda r: max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                                                     params["on"][r], params["avg"][r])))
    assert gap(2) > 1e-4


def test_local_training_lowers_the_contrastive_loss():
    """From the same state (5 rounds with mu = 0, so previous models differ from w_t), one round
    with mu = 5 ends the sampled clients' local training with a lower l_con on their own data
    than mu = 0, and with representations further from the previous local model (1 - sim at
    least doubles). One program: mu is traced."""
    data = fl.data.load("digits:dirichlet=0.3,clients=10", seed=0)
    model = fl.models.mlp(10, hidden=(32,))
    setup = fl.Setup.of(clients_per_round=5, local_steps=20, batch_size=16, client_lr=0.05)
    round_fn = jax.jit(lambda mu, state, key: moon(model, mu=mu, setup=setup).round(state, data, key)[0])
    state = moon(model, setup=setup).init(jax.random.key(0), data)
    for r in range(5):
        state = round_fn(0.0, state, jax.random.key(r))
    key = jax.random.key(99)
    ids = np.asarray(moon(model, setup=setup).server_round.sample(data, key))
    x = lambda i: data.x[int(data.offsets[i]):int(data.offsets[i + 1])]
    row = lambda s, i: jax.tree.map(lambda r: r[i], s.rows)
    cos = lambda a, b: jnp.sum(a * b, 1) / (jnp.linalg.norm(a, axis=1) * jnp.linalg.norm(b, axis=1) + 1e-8)
    l_con, prev = {}, {}
    for mu in (0.0, 5.0):
        new = round_fn(mu, state, key)
        z = [(model.features(row(new, i), x(i)), model.features(state.server.params, x(i)),
              model.features(row(state, i), x(i))) for i in ids]
        l_con[mu] = np.mean([float(jnp.mean(jnp.logaddexp(2 * cos(a, g), 2 * cos(a, p)) - 2 * cos(a, g)))
                             for a, g, p in z])                              # tau = 0.5
        prev[mu] = np.mean([float(jnp.mean(cos(a, p))) for a, g, p in z])
    print("l_con", l_con, "sim(z, z_prev)", prev)
    assert l_con[5.0] < l_con[0.0] - 0.01
    assert 1 - prev[5.0] > 2 * (1 - prev[0.0])


def test_bad_input_is_refused():
    model = fl.models.mlp(3, hidden=HIDDEN)
    with pytest.raises(ValueError, match="mu"):
        moon(model, mu=-1.0)
    with pytest.raises(ValueError, match="tau"):
        moon(model, tau=0.0)
    with pytest.raises(ValueError, match="model .* has no features"):
        moon(dataclasses.replace(model, features=None, head=None))
    with pytest.raises(ValueError, match="model 'logistic'"):
        moon(fl.models.logistic(3))
