"""FedAMP / HeurFedAMP: attention on clustered clients, one round against a per-client loop,
personalized accuracy vs FedAvg on a pathological non-iid split, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import data as D
from fedjax_lab import models, run
from fedjax_lab.algorithms.fedamp import attention_weights, fedamp, heurfedamp, pairwise_sq_dists
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.core import driver
from fedjax_lab.core.client_state import ClientRows
from fedjax_lab.core.evaluate import client_sums
from fedjax_lab.core.rounds import LocalWork, participate
from tests.reference import softmax_grads


def two_clusters(m=10, p=20, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (2, p))
    cluster = np.arange(m) % 2
    return jnp.asarray(centres[cluster] + 0.1 * rng.normal(0, 1, (m, p)), jnp.float32), cluster


@pytest.mark.parametrize("attention, kw", [("exp", dict(alpha_k=0.05, sigma=2.0)),
                                           ("cosine", dict(self_weight=0.3, sigma=10.0))])
def test_attention_stays_inside_clusters(attention, kw):
    W, cluster = two_clusters()
    m = W.shape[0]
    xi = np.asarray(attention_weights(W, W, jnp.arange(m), attention=attention,
                                      **dict(dict(alpha_k=0.01, sigma=1.0, self_weight=0.5), **kw)))
    np.testing.assert_allclose(xi.sum(1), 1.0, atol=1e-5)
    assert (xi >= 0).all()
    same = cluster[:, None] == cluster[None, :]
    off = ~np.eye(m, dtype=bool)
    share = (xi * (same & off)).sum(1) / (xi * off).sum(1)
    assert share.min() > 0.9, share          # > 90% of the neighbours' weight stays in the cluster
    assert ((xi * same).sum(1) > 0.9).all()  # and > 90% of all weight, self included


def test_gram_distances_match_double_loop():
    W, _ = two_clusters(m=7, p=5, seed=1)
    ref = np.array([[np.sum((np.asarray(a) - np.asarray(b)) ** 2) for b in W] for a in W])
    np.testing.assert_allclose(pairwise_sq_dists(W, W), ref, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("attention, neighbors, start", [("exp", "all", "own"),
                                                         ("cosine", "sampled", "cloud")])
def test_one_round_matches_per_client_loop(attention, neighbors, start):
    d = D.synthetic(1, 1, num_clients=6, seed=3, max_size=30, min_size=8)
    kw = dict(clients_per_round=3, local_steps=4, batch_size=5)
    lam, alpha_k, sigma, lr, xi_self = 0.5, 0.1, 1.5, 0.05, 0.4
    alg = fedamp(models.logistic(10), lam=lam, alpha_k=alpha_k, sigma=sigma, attention=attention,
                 self_weight=xi_self, neighbors=neighbors, start=start, client_lr=lr,
                 attention_chunk=2, **kw)                  # 2 does not divide 3: padded chunks
    state = jax.jit(alg.init)(jax.random.key(0), d)
    rows = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(5), x.shape), state.rows)
    key = jax.random.key(11)
    new, metrics = jax.jit(alg.round)(ClientRows(server=state.server, rows=rows), d, key)

    # reference: numpy, pairwise loops for the attention, one client at a time for training
    part = jax.jit(participate, static_argnums=2)(jax.random.split(key)[0], d, LocalWork(**kw))
    ids, idx, mask = (np.asarray(a) for a in (part.ids, part.batches.idx, part.batches.step_mask))
    x, y = np.asarray(d.x, np.float64), np.asarray(d.y)
    K, B = (np.array(rows["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
    flat = np.concatenate([B, K.reshape(6, -1)], axis=1)
    cand = list(range(6)) if neighbors == "all" else list(ids)
    newK, newB = K.copy(), B.copy()
    for i in ids:
        xi = {}
        for j in cand:
            if j == i:
                continue
            if attention == "exp":
                xi[j] = alpha_k * np.exp(-np.sum((flat[i] - flat[j]) ** 2) / sigma) / sigma
            else:
                cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
                xi[j] = np.exp(sigma * cos(flat[i], flat[j])) / sum(
                    np.exp(sigma * cos(flat[i], flat[h])) for h in cand if h != i) * (1 - xi_self)
        xi[i] = 1 - sum(xi.values()) if attention == "exp" else xi_self
        uK = sum(w * K[j] for j, w in xi.items())
        uB = sum(w * B[j] for j, w in xi.items())
        W, b = (K[i].copy(), B[i].copy()) if start == "own" else (uK.copy(), uB.copy())
        c = list(ids).index(i)
        for s in range(kw["local_steps"]):
            if mask[c, s]:
                gW, gb = softmax_grads(W, b, x[idx[c, s]], y[idx[c, s]])
                W = W - lr * (gW + lam / alpha_k * (W - uK))
                b = b - lr * (gb + lam / alpha_k * (b - uB))
        newK[i], newB[i] = W, b
    np.testing.assert_allclose(new.rows["Dense_0"]["kernel"], newK, atol=1e-5)
    np.testing.assert_allclose(new.rows["Dense_0"]["bias"], newB, atol=1e-5)


def test_personalized_beats_fedavg_on_pathological_split():
    # 2 classes per client (McMahan shards): every FedAMP client keeps its own model, pulled toward
    # the clients that look like it; FedAvg's single global model must serve all label pairs.
    d = D.digits(num_clients=20, partition="shards=2", seed=0, test_fraction=0.25)
    model = models.logistic(10)
    kw = dict(client_lr=0.1, clients_per_round=10, local_steps=10, batch_size=10)
    amp, avg = fedamp(model, lam=0.02, alpha_k=0.02, sigma=1.0, **kw), fedavg(model, **kw)
    k_init, k_rounds = jax.random.split(jax.random.key(0))
    train = lambda alg: driver.run_rounds(alg, jax.jit(alg.init)(k_init, d), d, k_rounds,
                                          jnp.int32(0), 30)
    (s_amp, m_amp), (s_avg, _) = train(amp), train(avg)
    accuracy = jax.jit(lambda params, test: client_sums(model, params, test, jnp.arange(20)))
    acc = lambda params: float(np.sum(accuracy(params, d.test)[1]) / d.test.num_examples)
    acc_amp = acc(s_amp.rows)
    acc_avg = acc(jax.tree.map(lambda x: jnp.broadcast_to(x, (20,) + x.shape), s_avg.params))
    assert acc_amp > acc_avg + 0.05, (acc_amp, acc_avg)
    assert acc_amp > 0.85
    assert 0.0 < float(m_amp["self_attention"][-1]) < 1.0


@pytest.mark.parametrize("kwargs, name", [
    (dict(lam=0.0), "lam"), (dict(alpha_k=-1.0), "alpha_k"), (dict(sigma=0.0), "sigma"),
    (dict(attention="dot"), "attention"), (dict(self_weight=1.5), "self_weight"),
    (dict(neighbors="some"), "neighbors"), (dict(start="zero"), "start"),
    (dict(attention_chunk=0), "attention_chunk"), (dict(lam=1.0, alpha_k=0.01, client_lr=0.1), "client_lr"), (dict(clients_per_round=0), "clients_per_round"),
])
def test_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        fedamp(models.logistic(3), **kwargs)


def test_alpha_too_large_for_the_number_of_clients_fails_before_compiling():
    d = D.synthetic(1, 1, num_clients=12, seed=0, max_size=20)
    with pytest.raises(ValueError, match="alpha_k"):
        run(fedamp(models.logistic(10), alpha_k=0.2, sigma=1.0, clients_per_round=4), d, rounds=1,
            key=0, progress=False)
    # HeurFedAMP has no such bound
    heurfedamp(models.logistic(10), alpha_k=0.2, clients_per_round=4).check(d)
