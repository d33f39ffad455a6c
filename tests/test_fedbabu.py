"""FedBABU (algorithms/fedbabu.py): a per-client reference loop over rounds with stragglers (body
trained and averaged, head frozen), the trained-head ablation (FedAvg bit for bit), the
fine-tuning of evaluation (alg.adapt), the claim on 2-label clients, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lab as fl
from fedjax_lab.algorithms.fedbabu import fedbabu
from tests.references.fedbabu import body_only
from tests.references.fedper import partial_round


@pytest.fixture(scope="module")
def shards():
    return fl.data.load("digits:shards=2,clients=8", seed=0)


def small(data):
    return fl.models.get("mlp", 10, data.x[:1], hidden=(8,))


SETUP = dict(clients_per_round=4, local_steps=3, batch_size=5, client_lr=0.1)


def test_fedbabu_matches_a_per_client_reference_loop(shards):
    alg = fedbabu(small(shards), setup=fl.Setup.of(**SETUP, stragglers=0.5))
    state = alg.init(jax.random.key(0), shards)
    w0 = jax.tree.map(np.asarray, alg.global_params(state))
    w = w0
    fn = jax.jit(alg.round)
    for r in range(3):
        key = jax.random.key(10 + r)
        state, metrics = fn(state, shards, key)
        w = partial_round(alg, shards, w, None, key, local="head", trains=body_only)[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 alg.global_params(state), w)
    jax.tree.map(np.testing.assert_array_equal, alg.global_params(state)["out"], w0["out"])
    assert np.abs(w["hidden_layers_0"]["kernel"] - w0["hidden_layers_0"]["kernel"]).max() > 1e-3
    body = sum(int(np.size(v)) * 4 for v in jax.tree.leaves(w["hidden_layers_0"]))
    assert float(metrics["bytes_up_per_client"]) == body == float(metrics["bytes_down_per_client"])


def test_trained_head_is_fedavg_bit_for_bit(shards):
    setup = fl.Setup.of(**SETUP)
    out = []
    for alg in (fedbabu(small(shards), freeze_head=False, setup=setup),
                fl.algorithms.fedavg(small(shards), setup=setup)):
        state, fn = alg.init(jax.random.key(0), shards), jax.jit(alg.round)
        for r in range(3):
            state = fn(state, shards, jax.random.key(r))[0]
        out.append(alg.global_params(state))
    jax.tree.map(np.testing.assert_array_equal, out[0], out[1])


@pytest.mark.parametrize("finetune_part", ["head", "full"])
def test_adapt_fine_tunes_the_named_part_on_the_train_split(shards, finetune_part):
    """alg.adapt moves the head (and, for "full", the body) of the global model, per client."""
    alg = fedbabu(small(shards), finetune_steps=4, finetune_part=finetune_part,
                  setup=fl.Setup.of(**SETUP))
    state = alg.init(jax.random.key(0), shards)
    ids = jnp.arange(3)
    adapted = alg.adapt(state, shards, ids)
    w = alg.global_params(state)
    head_moved = np.abs(adapted["out"]["kernel"] - w["out"]["kernel"][None]).max(axis=(1, 2))
    body_moved = np.abs(adapted["hidden_layers_0"]["kernel"]
                        - w["hidden_layers_0"]["kernel"][None]).max(axis=(1, 2))
    assert (head_moved > 1e-4).all()
    assert (body_moved > 1e-4).all() if finetune_part == "full" else (body_moved == 0).all()
    assert np.abs(adapted["out"]["kernel"][0] - adapted["out"]["kernel"][1]).max() > 1e-4


def test_body_aggregation_helps_the_global_model_and_fine_tuning_personalizes():
    """digits, 2 labels per client, 20 clients, 10 rounds: FedBABU's global model (random head,
    trained body) is more accurate than FedAvg's (freeze_head=False) before fine-tuning (the
    paper's "initial accuracy" under heterogeneity), and 10 head fine-tuning steps per client lift
    it far above that."""
    data = fl.data.load("digits:shards=2,clients=20", seed=0)
    model = fl.models.get("mlp", 10, data.x[:1], hidden=(32,))
    setup = fl.Setup.of(clients_per_round=10, local_steps=10, batch_size=16, client_lr=0.05)
    h = {}
    for freeze in (True, False):
        h[freeze] = fl.run(fedbabu(model, freeze_head=freeze, setup=setup), data, rounds=10,
                           key=0, eval_every=10, progress=False).history[-1]
    print({k: (v["test_accuracy"], v["test_adapted_accuracy"]) for k, v in h.items()})
    assert h[True]["test_accuracy"] > h[False]["test_accuracy"] + 0.05
    assert h[True]["test_adapted_accuracy"] > h[True]["test_accuracy"] + 0.3


def test_bad_input():
    with pytest.raises(ValueError, match="model 'logistic' is all head"):
        fedbabu(fl.models.logistic(10))
    with pytest.raises(ValueError, match="finetune_steps must be > 0"):
        fedbabu(fl.models.mlp(10), finetune_steps=0)
    with pytest.raises(ValueError, match="finetune_steps must be a positive integer"):
        fedbabu(fl.models.mlp(10), finetune_steps=2.5)
    with pytest.raises(ValueError, match="finetune_part must be one of"):
        fedbabu(fl.models.mlp(10), finetune_part="body")
    with pytest.raises(ValueError, match="freeze_head must be one of"):
        fedbabu(fl.models.mlp(10), freeze_head=None)
