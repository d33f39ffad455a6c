"""pFedMe (algorithms/pfedme.py): a per-client reference loop over rounds with stragglers
(theta~ by K inner steps, the envelope step on w, beta), beta = 1 the plain average, the claim
on 2-label clients, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lab as fl
from fedjax_lab.algorithms.pfedme import pfedme
from tests.references._common import as_logistic, logistic
from tests.references.pfedme import pfedme_round


@pytest.fixture(scope="module")
def synth():
    return fl.data.load("synthetic:1,1,clients=8,dim=20,classes=5,min_size=10,max_size=30", seed=0)


@pytest.mark.parametrize("beta", [1.0, 1.7])
def test_pfedme_matches_a_per_client_reference_loop(synth, beta):
    """Three rounds, K = 3, half the sampled clients straggling (dropped from the average, their
    theta kept), uniform weights for beta = 1.7."""
    setup = fl.Setup.of(clients_per_round=4, local_steps=4, batch_size=5, client_lr=0.05,
                        stragglers=0.5, weighting="examples" if beta == 1.0 else "uniform")
    alg = pfedme(fl.models.logistic(5), lam=5.0, inner_steps=3, personal_lr=0.1, beta=beta,
                 setup=setup)
    state = alg.init(jax.random.key(0), synth)
    W, b = logistic(alg.global_params(state))
    rows = [(W, b)] * synth.num_clients
    fn = jax.jit(alg.round)
    for r in range(3):
        key = jax.random.key(10 + r)
        state, _ = fn(state, synth, key)
        W, b, rows = pfedme_round(alg, synth, W, b, rows, key)
    check = lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)
    jax.tree.map(check, alg.global_params(state), as_logistic(W, b))
    jax.tree.map(check, alg.client_params(state, jnp.arange(synth.num_clients)),
                 as_logistic(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])))
    assert np.abs(rows[0][0] - W).max() > 1e-3 or np.abs(rows[1][0] - W).max() > 1e-3


def test_beta_scales_the_averaged_update_and_one_is_the_plain_average(synth):
    """After one round from the same w^0: w(beta) - w^0 = beta (w(1) - w^0), and w(1) is the
    n_k-weighted mean of the clients' w_{i,R} (their personalized rows are beta-independent)."""
    setup = fl.Setup.of(clients_per_round=4, local_steps=3, batch_size=5, client_lr=0.05)
    out = {}
    for beta in (1.0, 2.0):
        alg = pfedme(fl.models.logistic(5), beta=beta, setup=setup)
        state = alg.init(jax.random.key(0), synth)
        w0 = alg.global_params(state)
        state = jax.jit(alg.round)(state, synth, jax.random.key(3))[0]
        out[beta] = (alg.global_params(state), alg.client_params(state, jnp.arange(8)))
    d1 = jax.tree.map(lambda a, b: a - b, out[1.0][0], w0)
    d2 = jax.tree.map(lambda a, b: a - b, out[2.0][0], w0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 2 * b, rtol=1e-5, atol=1e-7), d2, d1)
    jax.tree.map(np.testing.assert_array_equal, out[1.0][1], out[2.0][1])
    assert max(float(np.abs(v).max()) for v in jax.tree.leaves(d1)) > 1e-3


def test_personalized_models_beat_fedavg_on_two_label_clients():
    """digits, 2 labels per client, 20 clients, 10 rounds: pFedMe's personalized theta_i are more
    accurate on their clients' test splits than FedAvg's global model (same seeds, setup, model)."""
    data = fl.data.load("digits:shards=2,clients=20", seed=0)
    model = fl.models.get("mlp", 10, data.x[:1], hidden=(32,))
    setup = fl.Setup.of(clients_per_round=10, local_steps=10, batch_size=16, client_lr=0.05)
    pm = fl.run(pfedme(model, setup=setup), data, rounds=10, key=0, eval_every=10,
                progress=False).history[-1]["test_personal_accuracy"]
    avg = fl.run(fl.algorithms.fedavg(model, setup=setup), data, rounds=10, key=0, eval_every=10,
                 progress=False).history[-1]["test_accuracy"]
    print({"pfedme": pm, "fedavg": avg})
    assert pm > avg + 0.1


def test_bad_input():
    m = fl.models.logistic(5)
    for name, value in [("lam", 0.0), ("lam", float("nan")), ("personal_lr", -1.0),
                        ("beta", 0.0), ("inner_steps", 0), ("inner_steps", 2.0)]:
        with pytest.raises(ValueError, match=name):
            pfedme(m, **{name: value})
