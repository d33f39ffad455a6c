"""APFL (algorithms/apfl.py): a per-client reference loop over rounds with stragglers (w, v_i,
alpha_i), alpha = 0 fixed is FedAvg bit for bit, the claim on 2-label clients, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lab as fl
from fedjax_lab.algorithms.apfl import apfl
from tests.references._common import logistic
from tests.references.apfl import apfl_round, deployed, initial_rows


@pytest.fixture(scope="module")
def shards():
    return fl.data.load("synthetic:1,1,clients=8,dim=20,classes=5,min_size=10,max_size=30", seed=0)


@pytest.mark.parametrize("adaptive_alpha", [True, False])
def test_apfl_matches_a_per_client_reference_loop(shards, adaptive_alpha):
    """Four rounds, half the sampled clients straggling (their w_i dropped from the average, their
    partial personal work kept), server lr 0.8; alpha moves (adaptive) or stays."""
    alg = apfl(fl.models.logistic(5), alpha=0.4, adaptive_alpha=adaptive_alpha,
               setup=fl.Setup.of(clients_per_round=4, local_steps=4, batch_size=5, client_lr=0.2,
                                 server_lr=0.8, stragglers=0.5))
    state = alg.init(jax.random.key(0), shards)
    W, b = logistic(alg.global_params(state))
    rows = initial_rows(state)
    fn = jax.jit(alg.round)
    for r in range(4):
        key = jax.random.key(10 + r)
        state, metrics = fn(state, shards, key)
        W, b, rows = apfl_round(alg, shards, W, b, rows, key)
    check = lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-4, atol=2e-6)
    check(state.server.params["Dense_0"]["kernel"], W)
    check(state.server.params["Dense_0"]["bias"], b)
    check(state.rows["alpha"], [a for _, _, a in rows])
    jax.tree.map(check, alg.client_params(state, jnp.arange(shards.num_clients)),
                 deployed(W, b, rows))
    alphas = np.asarray([a for _, _, a in rows])
    if adaptive_alpha:
        assert np.abs(alphas - 0.4).max() > 1e-3
    else:
        np.testing.assert_array_equal(np.asarray(state.rows["alpha"]), np.float32(0.4))


def test_fixed_alpha_zero_is_fedavg_bit_for_bit(shards):
    setup = fl.Setup.of(clients_per_round=4, local_steps=3, batch_size=5, client_lr=0.1)
    model = fl.models.logistic(5)
    out = []
    for alg in (apfl(model, alpha=0.0, adaptive_alpha=False, setup=setup),
                fl.algorithms.fedavg(model, setup=setup), apfl(model, alpha=0.5, setup=setup)):
        state, fn = alg.init(jax.random.key(0), shards), jax.jit(alg.round)
        for r in range(3):
            state = fn(state, shards, jax.random.key(r))[0]
        out.append(alg.client_params(state, jnp.arange(shards.num_clients)))
    jax.tree.map(np.testing.assert_array_equal, out[0], out[1])
    assert np.abs(out[2]["Dense_0"]["kernel"] - out[1]["Dense_0"]["kernel"]).max() > 1e-3


def test_personalized_mixture_beats_fedavg_on_two_label_clients():
    """digits, 2 labels per client, 20 clients, 10 rounds: the clients' mixtures v_bar_i (alpha
    learned from 0.5) are more accurate on their test splits than FedAvg's global model (alpha = 0
    fixed, same seeds, setup and model)."""
    data = fl.data.load("digits:shards=2,clients=20", seed=0)
    model = fl.models.get("mlp", 10, data.x[:1], hidden=(32,))
    setup = fl.Setup.of(clients_per_round=10, local_steps=10, batch_size=16, client_lr=0.05)
    acc = {}
    for on in (True, False):
        alg = apfl(model, alpha=0.5 if on else 0.0, adaptive_alpha=on, setup=setup)
        h = fl.run(alg, data, rounds=10, key=0, eval_every=10, progress=False).history[-1]
        acc[on] = (h["test_personal_accuracy"], h["mean_alpha"])
    print(acc)
    assert acc[True][0] > acc[False][0] + 0.1


def test_bad_input():
    with pytest.raises(ValueError, match="alpha must lie in"):
        apfl(fl.models.logistic(10), alpha=1.5)
    with pytest.raises(ValueError, match="alpha must lie in"):
        apfl(fl.models.logistic(10), alpha=float("nan"))
    with pytest.raises(ValueError, match="adaptive_alpha must be one of"):
        apfl(fl.models.logistic(10), adaptive_alpha="yes")
