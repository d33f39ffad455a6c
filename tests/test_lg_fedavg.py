"""LG-FedAvg (algorithms/lg_fedavg.py): a per-client reference loop over rounds with stragglers
(bodies as rows, the head averaged), the shared-body ablation (FedAvg bit for bit), the claim on
2-label clients, bad input."""
import jax
import numpy as np
import pytest

import fedjax_lab as fl
from fedjax_lab.algorithms.lg_fedavg import lg_fedavg
from tests.test_fedper import run_against_reference


@pytest.fixture(scope="module")
def shards():
    return fl.data.load("digits:shards=2,clients=8", seed=0)


def test_lg_fedavg_matches_a_per_client_reference_loop(shards):
    """Three rounds, half the sampled clients straggling (dropped), bodies carried across rounds;
    only the head travels."""
    model = fl.models.get("mlp", 10, shards.x[:1], hidden=(8,))
    alg = lg_fedavg(model, setup=fl.Setup.of(clients_per_round=4, local_steps=3, batch_size=5,
                                             client_lr=0.1, stragglers=0.5))
    state, metrics, w, rows = run_against_reference(alg, shards, "body")
    w0 = alg.global_params(alg.init(jax.random.key(0), shards))
    np.testing.assert_array_equal(w["hidden_layers_0"]["kernel"], w0["hidden_layers_0"]["kernel"])
    assert np.abs(w["out"]["kernel"] - w0["out"]["kernel"]).max() > 1e-3
    moved = [k for k in range(shards.num_clients) if np.abs(
        rows[k]["hidden_layers_0"]["kernel"] - w0["hidden_layers_0"]["kernel"]).max() > 0]
    assert 0 < len(moved) < shards.num_clients
    head = sum(int(np.size(v)) * 4 for v in jax.tree.leaves(w["out"]))
    assert float(metrics["bytes_up_per_client"]) == head == float(metrics["bytes_down_per_client"])


def test_shared_body_is_fedavg_bit_for_bit(shards):
    model = fl.models.get("mlp", 10, shards.x[:1], hidden=(8,))
    setup = fl.Setup.of(clients_per_round=4, local_steps=3, batch_size=5, client_lr=0.1)
    out = []
    for alg in (lg_fedavg(model, local_representation=False, setup=setup),
                fl.algorithms.fedavg(model, setup=setup)):
        state, fn = alg.init(jax.random.key(0), shards), jax.jit(alg.round)
        for r in range(3):
            state = fn(state, shards, jax.random.key(r))[0]
        out.append(alg.global_params(state))
    jax.tree.map(np.testing.assert_array_equal, out[0], out[1])


def test_local_representations_beat_fedavg_on_two_label_clients():
    """digits, 2 labels per client, 20 clients, 10 rounds: each client's own body under the shared
    head is more accurate on its test split than FedAvg's global model (local_representation=False,
    same seeds, setup and model)."""
    data = fl.data.load("digits:shards=2,clients=20", seed=0)
    model = fl.models.get("mlp", 10, data.x[:1], hidden=(32,))
    setup = fl.Setup.of(clients_per_round=10, local_steps=10, batch_size=16, client_lr=0.05)
    acc = {}
    for on in (True, False):
        h = fl.run(lg_fedavg(model, local_representation=on, setup=setup), data, rounds=10, key=0,
                   eval_every=10, progress=False).history[-1]
        acc[on] = h["test_personal_accuracy"] if on else h["test_accuracy"]
    print(acc)
    assert acc[True] > acc[False] + 0.1


def test_bad_input():
    with pytest.raises(ValueError, match="model 'logistic' is all head"):
        lg_fedavg(fl.models.logistic(10))
    with pytest.raises(ValueError, match="local_representation must be one of"):
        lg_fedavg(fl.models.mlp(10), local_representation=1.5)
