"""local_train: masked steps leave params *and* optimizer state untouched; extra loss terms count;
`loss` is the data loss, `objective` the full local objective."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab import models
from fedjax_lab.core.local import local_train
from tests.reference import softmax_grads


def _setup():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(30, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 30))
    model = models.logistic(3)
    params = model.init(jax.random.key(0), x[:1])
    idx = jnp.asarray(rng.integers(0, 30, (6, 4)), jnp.int32)
    return model, params, x, y, idx


def test_masked_steps_equal_skipping_them_with_stateful_optimizer():
    model, params, x, y, idx = _setup()
    tx = optax.adam(0.05)
    train = local_train(model, tx)
    mask = jnp.array([True, False, True, False, False, True])
    key = jax.random.key(1)
    out = train(params, x, y, idx, mask, key)
    # the same three steps with no masked steps between them
    keep = np.flatnonzero(np.asarray(mask))
    p, s = params, tx.init(params)
    losses = []
    for i in keep:
        loss, g = jax.value_and_grad(
            lambda q: jnp.mean(model.loss(model.apply(q, x[idx[i]]), y[idx[i]])))(p)
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        losses.append(loss)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), out.params, p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 out.opt_state, s)
    assert int(out.num_steps) == 3
    np.testing.assert_allclose(out.loss, np.mean(losses), rtol=1e-5)


def test_all_masked_is_identity():
    model, params, x, y, idx = _setup()
    out = local_train(model, optax.sgd(0.1, momentum=0.9))(
        params, x, y, idx, jnp.zeros(6, bool), jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, out.params, params)
    assert int(out.num_steps) == 0 and float(out.loss) == 0.0


def test_extra_loss_gradient_is_applied():
    model, params, x, y, idx = _setup()
    anchor = jax.tree.map(lambda a: a + 1.0, params)
    mu = 0.5
    prox = lambda w: 0.5 * mu * sum(jnp.sum((a - b) ** 2) for a, b in
                                    zip(jax.tree.leaves(w), jax.tree.leaves(anchor)))
    mask = jnp.array([True] + [False] * 5)
    plain = local_train(model, optax.sgd(0.1))(params, x, y, idx, mask, jax.random.key(0))
    proxed = local_train(model, optax.sgd(0.1), extra_loss=prox)(params, x, y, idx, mask,
                                                               jax.random.key(0))
    # one SGD step: the proximal gradient mu (w - anchor) = -mu moves every weight by +0.1 * mu
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a - b, 0.1 * mu, rtol=1e-5),
                 proxed.params, plain.params)


def _xent(W, b, x, y):
    z = x @ W + b
    z = z - z.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))


def test_loss_is_the_data_loss_and_objective_adds_the_regularizer():
    # Issue 10 item 7: `loss` is F_k (what a paper plots), not F_k + extra_loss. A large mu with
    # params far from the anchor makes the two differ by orders of magnitude.
    model, params, x, y, idx = _setup()
    anchor = jax.tree.map(lambda a: a + 3.0, params)
    mu, lr = 5.0, 0.02
    prox = lambda w: 0.5 * mu * sum(jnp.sum((a - b) ** 2) for a, b in
                                    zip(jax.tree.leaves(w), jax.tree.leaves(anchor)))
    mask = jnp.array([True, False, True, False, False, False])   # 2 real steps, masked between
    out = local_train(model, optax.sgd(lr), extra_loss=prox)(params, x, y, idx, mask,
                                                             jax.random.key(0))
    # numpy: plain SGD on F + mu/2 ||w - a||^2, data loss and regularizer at each real step's w
    W, b = (np.asarray(params["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
    aW, ab = (np.asarray(anchor["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
    xn, yn = np.asarray(x, np.float64), np.asarray(y)
    data, reg = [], []
    for s in np.flatnonzero(np.asarray(mask)):
        xb, yb = xn[np.asarray(idx[s])], yn[np.asarray(idx[s])]
        data.append(_xent(W, b, xb, yb))
        reg.append(0.5 * mu * (np.sum((W - aW) ** 2) + np.sum((b - ab) ** 2)))
        gW, gb = softmax_grads(W, b, xb, yb)
        W, b = W - lr * (gW + mu * (W - aW)), b - lr * (gb + mu * (b - ab))
    assert np.mean(reg) > 10 * np.mean(data)          # the test can tell the two apart
    assert int(out.num_steps) == 2
    np.testing.assert_allclose(out.loss, np.mean(data), rtol=1e-5)
    np.testing.assert_allclose(out.objective, np.mean(data) + np.mean(reg), rtol=1e-5)
    np.testing.assert_allclose(out.params["Dense_0"]["kernel"], W, rtol=1e-5, atol=1e-6)


def test_objective_equals_loss_without_extra_loss_and_both_are_zero_with_no_steps():
    model, params, x, y, idx = _setup()
    train = local_train(model, optax.sgd(0.1))
    out = train(params, x, y, idx, jnp.ones(6, bool), jax.random.key(0))
    assert float(out.objective) == float(out.loss) > 0
    none = train(params, x, y, idx, jnp.zeros(6, bool), jax.random.key(0))
    assert float(none.objective) == float(none.loss) == 0.0


def test_unrolled_scan_equals_a_loop_of_steps():
    model, params, x, y, idx = _setup()
    tx = optax.sgd(0.1, momentum=0.9)
    mask = jnp.array([True, True, False, True, True, True])
    p, s = params, tx.init(params)
    for i in np.flatnonzero(np.asarray(mask)):
        g = jax.grad(lambda q: jnp.mean(model.loss(model.apply(q, x[idx[i]]), y[idx[i]])))(p)
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
    for unroll in (True, 4):
        out = local_train(model, tx, unroll=unroll)(params, x, y, idx, mask, jax.random.key(0))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     out.params, p)


@pytest.mark.parametrize("kw,match", [(dict(unroll=0), "unroll"), (dict(unroll=1.5), "unroll"),
                                      (dict(chunk=0), "chunk"), (dict(clients="loop"), "clients")])
def test_bad_options_name_the_argument(kw, match):
    model, *_ = _setup()
    with pytest.raises(ValueError, match=match):
        local_train(model, optax.sgd(0.1), **kw)


@pytest.mark.slow
@pytest.mark.parametrize("clients,chunk", [("map", 2)])   # 5 clients: a partial last chunk
def test_cnn_clients_in_chunks_equal_a_per_client_loop(clients, chunk):
    # the memory bound of a round on CPU: clients run `chunk` at a time inside one program
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((30, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, 30))
    model = models.cnn(4)
    params = model.init(jax.random.key(0), x[:1])
    C = 5
    idx = jnp.asarray(rng.integers(0, 30, (C, 2, 3)), jnp.int32)
    mask = jnp.asarray(rng.random((C, 2)) < 0.7)
    keys = jax.random.split(jax.random.key(1), C)
    train = local_train(model, optax.sgd(0.05), clients=clients, chunk=chunk)
    out = jax.jit(jax.vmap(train, in_axes=(None, None, None, 0, 0, 0)))(params, x, y, idx, mask, keys)
    step = jax.jit(lambda p, xb, yb: jax.tree.map(lambda a, b: a - 0.05 * b, p, jax.grad(
        lambda q: jnp.mean(model.loss(model.apply(q, xb), yb)))(p)))
    for c in range(C):
        p = params
        for s in np.flatnonzero(np.asarray(mask[c])):
            p = step(p, x[idx[c, s]], y[idx[c, s]])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[c], b, rtol=1e-5, atol=1e-6),
                     out.params, p)


@pytest.mark.parametrize("chunk", [1, 3, 7, 10])
def test_weighted_sum_over_clients_in_chunks_equals_a_loop(chunk):
    from fedjax_lab.core.local import weighted_sum_over_clients
    model, params, x, y, _ = _setup()
    rng = np.random.default_rng(4)
    C = 7
    idx = jnp.asarray(rng.integers(0, 30, (C, 3, 4)), jnp.int32)
    mask = jnp.asarray(rng.random((C, 3)) < 0.8)
    weights = jnp.asarray(rng.random(C), jnp.float32)
    keys = jax.random.split(jax.random.key(2), C)
    train = local_train(model, optax.sgd(0.1))

    def client(i, m, k):
        res = train(params, x, y, i, m, k)
        return jax.tree.map(jnp.subtract, res.params, params), res.loss

    total, loss = jax.jit(lambda *a: weighted_sum_over_clients(client, *a, chunk=chunk))(
        weights, idx, mask, keys)
    # reference: one client at a time, plain SGD steps, weighted sum in float64
    want = jax.tree.map(lambda a: np.zeros(a.shape), params)
    want_loss = 0.0
    for c in range(C):
        p, losses = params, []
        for s in np.flatnonzero(np.asarray(mask[c])):
            lo, g = jax.value_and_grad(
                lambda q: jnp.mean(model.loss(model.apply(q, x[idx[c, s]]), y[idx[c, s]])))(p)
            p = jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
            losses.append(float(lo))
        want = jax.tree.map(lambda t, a, b: t + float(weights[c]) * (np.asarray(a) - np.asarray(b)),
                            want, p, params)
        want_loss += float(weights[c]) * (np.mean(losses) if losses else 0.0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), total, want)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
