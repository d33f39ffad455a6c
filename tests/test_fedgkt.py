"""FedGKT: one round against a per-client reference loop written from the paper's equations (both
server options), the per-example logits store, bad input; and (slow) the learning claim: the
client + server pair beats every small-model-only ablation with the same client compute."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import Optimizer, Setup
from fedjax_lab import data as D
from fedjax_lab import models
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.fedgkt import client_alone_sums, fedgkt
from fedjax_lab.core import driver, evaluate
from fedjax_lab.core.client_state import ClientRows
from fedjax_lab.core.rounds import participate
from fedjax_lab.core.setup import Cohort, LocalWork
from fedjax_lab.core.types import Model
from fedjax_lab.models import gkt

K = 3


def tiny_data(seed=0, sizes=(5, 9, 7, 6)):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(n, 4, 4, 1)).astype(np.float32) for n in sizes]
    ys = [rng.integers(0, K, n).astype(np.int32) for n in sizes]
    return D.from_client_lists(xs, ys, num_classes=K)


def tiny_pair():
    return gkt.gkt_pair(K, client_channels=2, server_channels=(3,), hidden=5)


from tests.references.fedgkt import (client_forward, client_grads, im2col, kl,  # noqa: F401,E402
                                     log_softmax, loss_and_dz, reference_round, server_forward,
                                     server_grads, softmax, tree, uniform)


def perturbed_state(alg, data):
    """Clients that differ from each other and a server that has answered some examples."""
    state = jax.jit(alg.init)(jax.random.key(0), data)
    rows = dict(state.rows, params=jax.tree.map(
        lambda a: a + 0.3 * jax.random.normal(jax.random.key(5), a.shape), state.rows["params"]))
    n = data.num_examples
    server = state.server.replace(
        logits=2.0 * jax.random.normal(jax.random.key(6), (n, K)),
        has_logits=jax.random.bernoulli(jax.random.key(7), 0.5, (n,)))
    return ClientRows(server=server, rows=rows)


HP = dict(alpha=0.7, temperature=2.0, server_epochs=2, server_batch_size=4)
SETUP = Setup(client_opt=Optimizer("sgd", lr=0.2), server_opt=Optimizer("sgd", lr=0.1, momentum=0.9),
              cohort=Cohort(clients_per_round=3), work=LocalWork(batch_size=3, local_steps=3))


@functools.lru_cache(maxsize=None)
def compiled(distill, mode):
    """(alg, jitted round) of the tiny setup, shared by the tests (one compilation each)."""
    alg = fedgkt(tiny_pair(), server_distill=distill, server_logits=mode, setup=SETUP, **HP)
    return alg, jax.jit(alg.round)


@pytest.mark.parametrize("distill, mode", [
    (True, "last_epoch"),                                     # the paper's defaults
    pytest.param(False, "final", marks=pytest.mark.slow),     # the other two options (a compile)
])
def test_one_round_matches_per_client_loop(distill, mode):
    data = tiny_data()
    alg, round_fn = compiled(distill, mode)
    state = perturbed_state(alg, data)
    key = jax.random.key(11)
    new, metrics = round_fn(state, data, key)
    rows, ws, logits, has, ref_metrics, ids = reference_round(
        state, data, key, alpha=0.7, T=2.0, epochs=2, batch=4, distill=distill, mode=mode,
        client_lr=0.2, server_lr=0.1, momentum=0.9, cohort=alg.setup.cohort, work=alg.setup.work)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                                    atol=1e-5)
    jax.tree.map(close, new.rows["params"], rows)
    jax.tree.map(close, new.server.params, ws)
    close(new.server.logits, logits)
    np.testing.assert_array_equal(new.server.has_logits, has)
    for name, value in ref_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-4, err_msg=name)
    # the unsampled client keeps its row bit for bit
    other = np.setdiff1d(np.arange(data.num_clients), ids)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a)[other],
                                                            np.asarray(b)[other]),
                 new.rows["params"], state.rows["params"])
    assert 0 < ref_metrics["bytes_down"] < ref_metrics["bytes_up"]
    offsets = np.asarray(data.offsets)
    sampled = np.concatenate([np.arange(offsets[k], offsets[k + 1]) for k in ids])
    answered = np.asarray(state.server.has_logits)[sampled]
    assert answered.any() and not answered.all()    # both branches of the KD mask are exercised


def test_first_round_and_the_deployed_pair():
    # from the initial state the server has answered nothing: the clients train on CE only and
    # nothing is sent down; afterwards exactly the sampled clients' examples have logits (stored
    # at their own rows: the reference test checks the values). What client k deploys is the pair
    # f_s(f_e^(k)(x)) of its own extractor and the server's model.
    data = tiny_data()
    alg, round_fn = compiled(True, "last_epoch")
    pair = alg.model
    state = jax.jit(alg.init)(jax.random.key(0), data)
    assert not bool(state.server.has_logits.any())
    state, metrics = round_fn(state, data, jax.random.key(1))
    assert float(metrics["bytes_down"]) == 0.0
    ids = np.asarray(alg.rows_round.sample(data, jax.random.key(1)))
    offsets = np.asarray(data.offsets)
    sampled = np.zeros(data.num_examples, bool)
    for k in ids:
        sampled[offsets[k]:offsets[k + 1]] = True
    np.testing.assert_array_equal(state.server.has_logits, sampled)
    assert not np.asarray(state.server.logits)[~sampled].any()
    k = int(ids[0])
    x = data.client(k)[0]
    p = jax.tree.map(lambda a: a[0], alg.client_params(state, jnp.array([k])))
    own = jax.tree.map(lambda a: a[k], state.rows["params"])
    np.testing.assert_allclose(pair.apply(p, x), pair.server.apply(
        state.server.params, pair.client.features(own, x)), rtol=1e-5, atol=1e-6)
    alone = jax.device_get(client_alone_sums(alg, state, data))
    correct = np.sum(np.argmax(np.asarray(pair.client.apply(own, x)), -1) == np.asarray(
        data.client(k)[1]))
    np.testing.assert_allclose(alone[1][k], correct)


# ---------------------------------------------------------------------------------------------
# Bad input.

def test_model_without_features_head_is_rejected():
    plain = Model(init=lambda key, x: {"w": jnp.zeros((x.shape[-1], K))},
                  apply=lambda p, x, **_: x @ p["w"], name="plain")
    with pytest.raises(ValueError, match="model: FedGKT needs a client model with a features"):
        fedgkt(plain, server=gkt.gkt_server(K))
    with pytest.raises(ValueError, match="server: FedGKT needs the server model"):
        fedgkt(gkt.gkt_client(K))


def test_feature_shape_mismatch_names_the_server():
    data = tiny_data()
    # an MLP client hands flat features [n, 200] to a server whose convolutions want a map
    alg = fedgkt(models.mlp(K, hidden=(6,)), server=models.cnn(K))
    with pytest.raises(ValueError, match=r"server: the server model cannot take the client's "
                                         r"features of shape \(6,\)"):
        alg.init(jax.random.key(0), data)
    wrong = fedgkt(gkt.gkt_client(K), server=gkt.gkt_server(K + 2))
    with pytest.raises(ValueError, match=r"server: .* logits of shape \(5,\), expected \(3,\)"):
        wrong.check(data)
    with pytest.raises(ValueError, match=r"model: .* expected \(3,\)"):
        fedgkt(gkt.gkt_pair(K + 1)).check(data)


@pytest.mark.parametrize("kwargs, name", [
    (dict(alpha=-0.1), "alpha"), (dict(temperature=0.0), "temperature"),
    (dict(server_epochs=0), "server_epochs"), (dict(server_epochs=1.5), "server_epochs"),
    (dict(server_batch_size=0), "server_batch_size"), (dict(server_logits="after"), "server_logits"),
    (dict(server_distill="yes"), "server_distill"),
    (dict(setup=Setup.of(aggregator="median")), "aggregator"),
])
def test_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        fedgkt(tiny_pair(), **kwargs)


# ---------------------------------------------------------------------------------------------
# The learning claim (slow).

def accuracy(sums):
    return evaluate.summarize("t", *jax.device_get(sums))["t_accuracy"]


@pytest.mark.slow
def test_pair_beats_every_small_model_alone():
    # digits, 10 clients, Dirichlet(1.0) labels, held-out 25% per client; the same client work
    # (1 local epoch of batch 10 a round, Adam 0.03) for every row. The small model is one 3x3
    # conv of 8 channels + global average pooling + linear (170 parameters); the server's model
    # sees the whole 8x8x8 feature map.
    data = D.digits(num_clients=10, partition="dirichlet=1.0", seed=0, test_fraction=0.25)
    pair = gkt.gkt_pair(10, server_channels=(16,), hidden=64)
    setup = Setup(cohort=Cohort(clients_per_round=10), work=LocalWork(batch_size=10, epochs=1),
                  client_opt=Optimizer("adam", lr=0.03, b2=0.999, eps=1e-8))
    rounds = 30
    acc = {}
    for name, a in (("fedgkt", 1.0), ("alone", 0.0)):       # alpha = 0: clients train alone on CE
        alg = fedgkt(pair, alpha=a, server_batch_size=64, setup=setup)
        st = driver.run(alg, data, rounds=rounds, key=0, eval_every=rounds, progress=False).state
        acc[name, "pair"] = accuracy(driver.evaluate(alg, st, data)["test_personal"])
        acc[name, "client"] = accuracy(client_alone_sums(alg, st, data.test))
    small = fedavg(pair.client, setup=Setup(cohort=setup.cohort, work=setup.work,
                                            client_opt=setup.client_opt))
    st = driver.run(small, data, rounds=rounds, key=0, eval_every=rounds, progress=False).state
    acc["fedavg_small"] = accuracy(driver.evaluate(small, st, data)["test"])
    print(acc)
    best_small = max(acc["fedgkt", "client"], acc["alone", "client"], acc["fedavg_small"])
    assert acc["fedgkt", "pair"] > best_small + 0.1, acc
    assert acc["fedgkt", "pair"] > 0.9, acc
