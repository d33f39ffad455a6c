"""FedRep (algorithms/fedrep.py): the phase-gated client optimizer, a per-client reference loop
over rounds with stragglers (head steps, then body steps), the joint-training ablation (FedPer bit
for bit), the claim on 2-label clients, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lab as fl
from fedjax_lab.algorithms.fedper import fedper
from fedjax_lab.algorithms.fedrep import fedrep, head_then_body
from tests.references.fedper import deployed, partial_round, split
from tests.references.fedrep import phases


@pytest.fixture(scope="module")
def shards():
    return fl.data.load("digits:shards=2,clients=8", seed=0)


def small(data):
    return fl.models.get("mlp", 10, data.x[:1], hidden=(8,))


def test_head_then_body_gates_updates_and_keeps_each_phase_momentum():
    """SGD with momentum 0.5, head_steps=2, gradient 1 everywhere: the head moves by lr(1, 1.5)
    then stops, the body stands still for two steps and then moves by lr(1, 1.5) (its momentum
    starts afresh: the head phase never touched it)."""
    params = {"hidden_layers_0": {"kernel": jnp.zeros(2)}, "out": {"kernel": jnp.zeros(3)}}
    tx = head_then_body(optax.sgd(0.1, momentum=0.5), "out", head_steps=2)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    moves = []
    for _ in range(4):
        u, state = tx.update(grads, state, params)
        moves.append((float(u["out"]["kernel"][0]), float(u["hidden_layers_0"]["kernel"][0])))
    np.testing.assert_allclose(moves, [(-0.1, 0), (-0.15, 0), (0, -0.1), (0, -0.15)], rtol=1e-6)


def test_fedrep_matches_a_per_client_reference_loop(shards):
    """Three rounds, 2 head steps then 3 body steps, half the sampled clients straggling (fewer
    steps: some train their head only; dropped from the average, as FedAvg does)."""
    alg = fedrep(small(shards), head_steps=2,
                 setup=fl.Setup.of(clients_per_round=4, local_steps=5, batch_size=5,
                                   client_lr=0.1, stragglers=0.5))
    state = alg.init(jax.random.key(0), shards)
    w = jax.tree.map(np.asarray, alg.global_params(state))
    rows = [split(w, "head")[1]] * shards.num_clients
    fn = jax.jit(alg.round)
    for r in range(3):
        key = jax.random.key(10 + r)
        state, _ = fn(state, shards, key)
        w, rows = partial_round(alg, shards, w, rows, key, local="head", trains=phases(2))
    check = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    jax.tree.map(check, alg.global_params(state), w)
    jax.tree.map(check, alg.client_params(state, jnp.arange(shards.num_clients)),
                 deployed(w, rows, "head"))


def test_joint_training_is_fedper_bit_for_bit_and_the_phases_differ(shards):
    setup = fl.Setup.of(clients_per_round=4, local_steps=4, batch_size=5, client_lr=0.1)
    out = []
    for alg in (fedrep(small(shards), head_steps=2, alternating=False, setup=setup),
                fedper(small(shards), setup=setup), fedrep(small(shards), setup=setup)):
        state, fn = alg.init(jax.random.key(0), shards), jax.jit(alg.round)
        for r in range(3):
            state = fn(state, shards, jax.random.key(r))[0]
        out.append(alg.client_params(state, jnp.arange(shards.num_clients)))
    jax.tree.map(np.testing.assert_array_equal, out[0], out[1])
    assert np.abs(out[2]["out"]["kernel"] - out[1]["out"]["kernel"]).max() > 1e-3


def test_fedrep_beats_fedavg_on_two_label_clients():
    """digits, 2 labels per client, 20 clients, 10 rounds of 10 head + 10 body steps: FedRep's
    personalized accuracy beats FedAvg's global model (same seeds, setup and model)."""
    data = fl.data.load("digits:shards=2,clients=20", seed=0)
    model = fl.models.get("mlp", 10, data.x[:1], hidden=(32,))
    setup = fl.Setup.of(clients_per_round=10, local_steps=20, batch_size=16, client_lr=0.05)
    rep = fl.run(fedrep(model, head_steps=10, setup=setup), data, rounds=10, key=0, eval_every=10,
                 progress=False).history[-1]["test_personal_accuracy"]
    avg = fl.run(fl.algorithms.fedavg(model, setup=setup), data, rounds=10, key=0, eval_every=10,
                 progress=False).history[-1]["test_accuracy"]
    print({"fedrep": rep, "fedavg": avg})
    assert rep > avg + 0.1


def test_bad_input():
    with pytest.raises(ValueError, match="model 'logistic' is all head"):
        fedrep(fl.models.logistic(10))
    with pytest.raises(ValueError, match="head_steps must be a positive integer"):
        fedrep(fl.models.mlp(10), head_steps=1.5)
    with pytest.raises(ValueError, match="head_steps=5 leaves no body step"):
        fedrep(fl.models.mlp(10), head_steps=5, setup=fl.Setup.of(local_steps=5))
    with pytest.raises(ValueError, match="head_steps must be given"):
        fedrep(fl.models.mlp(10), setup=fl.Setup.of(epochs=2))
    with pytest.raises(ValueError, match="alternating must be one of"):
        fedrep(fl.models.mlp(10), alternating="no")
