"""Ditto: closed form on federated mean estimation, one round against a per-client loop,
robustness to label-flipping attackers, new-client evaluation, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab import data as D
from fedjax_lab import models, run
from fedjax_lab.algorithms.ditto import ditto
from fedjax_lab.attacks import flip_labels, malicious_clients
from fedjax_lab.core import driver, evaluate
from fedjax_lab.core.client_state import ClientRows
from fedjax_lab.core.rounds import LocalWork, participate
from tests.reference import softmax_grads



def mean_data(num_clients=5, per_client=4, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2, (num_clients, dim))
    xs = [c + rng.normal(0, 0.5, (per_client, dim)) for c in centers]
    ys = [np.zeros(per_client, np.int32) for _ in xs]
    return D.from_client_lists(xs, ys, test_xs=xs, test_ys=ys, num_classes=1), \
        np.stack([x.mean(0) for x in xs])


def run_rounds(alg, d, rounds, seed=0):
    state = jax.jit(alg.init)(jax.random.key(seed), d)
    return driver.run_rounds(alg, state, d, jax.random.key(seed + 1), jnp.int32(0), rounds)[0]


def test_mean_estimation_closed_form():
    # F_k(v) = 1/2 ||v - c_k||^2 (full-batch steps) => v_k* = (c_k + lam w*) / (1 + lam), w* = mean c_k
    d, c = mean_data()
    lam = 0.5
    alg = ditto(models.quadratic(3), lam=lam, client_lr=0.1, clients_per_round=5, local_steps=5,
                batch_size=4, weighting="uniform", shuffle="epoch")
    state = run_rounds(alg, d, 150)
    w_star = c.mean(0)
    np.testing.assert_allclose(alg.global_params(state)["x"], w_star, atol=1e-4)
    v = alg.client_params(state, jnp.arange(5))["x"]
    np.testing.assert_allclose(v, (c + lam * w_star) / (1 + lam), atol=1e-4)
    # and it is not simply the local optimum or the global model
    assert np.abs(np.asarray(v) - c).max() > 0.1
    assert np.abs(np.asarray(v) - w_star).max() > 0.1


def test_new_client_adaptation_closed_form():
    # a client that adapts w with Ditto's objective reaches (c_k + lam w) / (1 + lam)
    d, c = mean_data(num_clients=3, seed=1)
    w = {"x": jnp.array([1.0, -1.0, 0.5])}
    lam = 2.0
    adapt = evaluate.adapted_client_params(models.quadratic(3), optax.sgd(0.1), d, steps=200,
                                           batch_size=4, lam=lam)
    v = jax.jit(adapt)((w, jax.random.key(0)), jnp.arange(3))["x"]
    np.testing.assert_allclose(v, (c + lam * np.asarray(w["x"])) / (1 + lam), atol=1e-4)
    l, correct, n = jax.jit(lambda w, d, k: evaluate.adapted_sums(
        models.quadratic(3), optax.sgd(0.1), w, d, k, steps=200, batch_size=4, lam=lam))(
            w, d, jax.random.key(0))
    ref = [0.5 * np.sum((np.asarray(v[k]) - np.asarray(d.test.client(k)[0])) ** 2) for k in range(3)]
    np.testing.assert_allclose(l, ref, rtol=1e-4)



def test_one_round_matches_per_client_loop():
    d = D.synthetic(1, 1, num_clients=6, seed=3, max_size=30, min_size=8)
    kw = dict(clients_per_round=3, local_steps=4, batch_size=5)
    lam, mu, lr, plr = 0.3, 0.05, 0.05, 0.02
    alg = ditto(models.logistic(10), lam=lam, mu=mu, client_lr=lr, personal_lr=plr, **kw)
    state = jax.jit(alg.init)(jax.random.key(0), d)
    # make the personal rows differ from w_0 so the rows really are per client
    rows = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(5), x.shape), state.rows)
    state = ClientRows(server=state.server, rows=rows)
    key = jax.random.key(11)
    new, _ = jax.jit(alg.round)(state, d, key)

    # reference: numpy, one client at a time, plain SGD written out (same sampled ids and batches)
    part = jax.jit(participate, static_argnums=2)(jax.random.split(key, 3)[0], d, LocalWork(**kw))
    ids, idx, mask = (np.asarray(a) for a in (part.ids, part.batches.idx, part.batches.step_mask))
    x, y = np.asarray(d.x, np.float64), np.asarray(d.y)
    Wt, bt = (np.asarray(state.server.params["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
    V, Vb = (np.array(rows["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
    dW, db, n = np.zeros_like(Wt), np.zeros_like(bt), 0.0
    for c, k in enumerate(ids):
        vW, vb, W, b = V[k].copy(), Vb[k].copy(), Wt.copy(), bt.copy()
        for s in range(kw["local_steps"]):
            if not mask[c, s]:
                continue
            xb, yb = x[idx[c, s]], y[idx[c, s]]
            gW, gb = softmax_grads(vW, vb, xb, yb)
            vW, vb = vW - plr * (gW + lam * (vW - Wt)), vb - plr * (gb + lam * (vb - bt))
            gW, gb = softmax_grads(W, b, xb, yb)
            W, b = W - lr * (gW + mu * (W - Wt)), b - lr * (gb + mu * (b - bt))
        V[k], Vb[k] = vW, vb
        n_k = float(part.num_examples[c])
        dW, db, n = dW + n_k * (W - Wt), db + n_k * (b - bt), n + n_k
    np.testing.assert_allclose(new.rows["Dense_0"]["kernel"], V, atol=1e-5)
    np.testing.assert_allclose(new.rows["Dense_0"]["bias"], Vb, atol=1e-5)
    np.testing.assert_allclose(new.server.params["Dense_0"]["kernel"], Wt + dW / n, atol=1e-5)
    np.testing.assert_allclose(new.server.params["Dense_0"]["bias"], bt + db / n, atol=1e-5)
    # the rows of the clients that were not sampled are untouched, bit for bit
    others = np.setdiff1d(np.arange(6), ids)
    np.testing.assert_array_equal(np.asarray(new.rows["Dense_0"]["kernel"])[others],
                                  np.asarray(rows["Dense_0"]["kernel"])[others])


def benign_accuracy(sums, benign):
    l, c, n = (np.asarray(v) for v in sums)
    return float(c[benign].sum() / n[benign].sum())


def test_robust_to_label_flipping_attackers():
    # Paper, Sec. 5.2: under attack, benign clients' Ditto models degrade far less than the global
    # FedAvg model. Ditto's global model *is* FedAvg's (same solver), so one run measures both.
    # The attackers' labels are flipped in the data (what attack="label_flip" does inside the
    # round), so clean and attacked runs share one compiled program.
    d = D.digits(num_clients=20, partition="shards=2", seed=0, test_fraction=0.25)
    malicious = malicious_clients(20, 0.5, seed=0)
    benign = ~np.asarray(malicious)
    alg = ditto(models.logistic(10), client_lr=0.1, clients_per_round=10, local_steps=10,
                batch_size=10, lam=0.5)
    acc = {}
    for name, data in (("clean", d), ("attacked", flip_labels(d, malicious))):
        st = run(alg, data, rounds=40, key=0, eval_every=40, progress=False).state
        sums = jax.device_get(driver.evaluate(alg, st, d))
        acc[name, "fedavg"] = benign_accuracy(sums["test"], benign)
        acc[name, "ditto"] = benign_accuracy(sums["test_personal"], benign)
    drop_fedavg = acc["clean", "fedavg"] - acc["attacked", "fedavg"]
    drop_ditto = acc["clean", "ditto"] - acc["attacked", "ditto"]
    assert drop_fedavg > 0.15, acc
    assert drop_ditto < 0.3 * drop_fedavg, acc
    assert acc["attacked", "ditto"] > acc["attacked", "fedavg"] + 0.2, acc


@pytest.mark.parametrize("kwargs, name", [
    (dict(lam=-0.1), "lam"), (dict(mu=-1.0), "mu"), (dict(personal_lr=0.0), "personal_lr"),
    (dict(personal_steps=0), "personal_steps"), (dict(attack="boom"), "attack"),
    (dict(attack="gaussian", attack_fraction=1.0), "attack_fraction"), (dict(clients_per_round=0), "clients_per_round"),
    (dict(client_optimizer="sgdd"), "client_optimizer"), (dict(personal_steps=3, epochs=1),
                                                          "personal_steps"),
])
def test_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ditto(models.logistic(3), **kwargs)


def test_more_clients_per_round_than_clients_fails_before_compiling():
    d = D.synthetic(1, 1, num_clients=4, seed=0, max_size=20)
    with pytest.raises(ValueError, match="clients_per_round"):
        run(ditto(models.logistic(10), clients_per_round=5), d, rounds=1, key=0, progress=False)
