"""FedPer (algorithms/fedper.py) and the body/head split (algorithms/_split.py): a per-client
reference loop over rounds with stragglers, the shared-head ablation (FedAvg bit for bit), the
claim on 2-label clients, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lab as fl
from fedjax_lab.algorithms import _split
from fedjax_lab.algorithms.fedper import fedper
from fedjax_lab.models.hypernet import head_leaves
from tests.references.fedper import deployed, partial_round, split


@pytest.fixture(scope="module")
def shards():
    return fl.data.load("digits:shards=2,clients=8", seed=0)


def check(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)       # float32 vs float64


def run_against_reference(alg, data, local, rounds=3):
    state = alg.init(jax.random.key(0), data)
    w = jax.tree.map(np.asarray, alg.global_params(state))
    rows = [split(w, local)[1]] * data.num_clients
    fn = jax.jit(alg.round)
    for r in range(rounds):
        key = jax.random.key(10 + r)
        state, metrics = fn(state, data, key)
        w, rows = partial_round(alg, data, w, rows, key, local=local)
    jax.tree.map(check, alg.global_params(state), w)
    jax.tree.map(check, alg.client_params(state, jnp.arange(data.num_clients)),
                 deployed(w, rows, local))
    return state, metrics, w, rows


@pytest.mark.parametrize("model_name", ["mlp", "mlp_bn", "cnn", "cnn_cifar", "resnet8"])
def test_the_head_table_is_what_the_head_reads(model_name):
    """_split.HEAD names the leaves `model.head` reads (models/hypernet.head_leaves: its jaxpr)."""
    shape = (1, 8) if model_name.startswith("mlp") else (1, 32, 32, 3)
    model = fl.models.get(model_name, 10)
    sample = jnp.zeros(shape)
    params = jax.eval_shape(model.init, jax.random.key(0), sample)
    head = _split.split(params, _split.head_name(model))[1]
    want = head_leaves(model, sample)
    leaves_with_path = jax.tree_util.tree_flatten_with_path(params)[0]
    head_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(head)[0]}
    got = [jax.tree_util.keystr(p) in head_paths for p, _ in leaves_with_path]
    assert got == want and any(got) and not all(got)


def test_fedper_matches_a_per_client_reference_loop(shards):
    """Three rounds, half the sampled clients straggling (dropped), heads carried across rounds."""
    model = fl.models.get("mlp", 10, shards.x[:1], hidden=(8,))
    alg = fedper(model, setup=fl.Setup.of(clients_per_round=4, local_steps=3, batch_size=5,
                                          client_lr=0.1, stragglers=0.5))
    state, metrics, w, rows = run_against_reference(alg, shards, "head")
    w0 = alg.global_params(alg.init(jax.random.key(0), shards))
    np.testing.assert_array_equal(w["out"]["kernel"], w0["out"]["kernel"])    # global head unused
    moved = [k for k in range(shards.num_clients)
             if np.abs(rows[k]["out"]["kernel"] - w0["out"]["kernel"]).max() > 0]
    assert 0 < len(moved) < shards.num_clients          # some heads trained, some not yet
    body = sum(int(np.size(v)) * 4 for k, sub in w.items() if k != "out"
               for v in jax.tree.leaves(sub))
    assert float(metrics["bytes_up_per_client"]) == body == float(metrics["bytes_down_per_client"])


def test_shared_head_is_fedavg_bit_for_bit(shards):
    model = fl.models.get("mlp", 10, shards.x[:1], hidden=(8,))
    setup = fl.Setup.of(clients_per_round=4, local_steps=3, batch_size=5, client_lr=0.1)
    out = []
    for alg in (fedper(model, personal_head=False, setup=setup),
                fl.algorithms.fedavg(model, setup=setup), fedper(model, setup=setup)):
        state, fn = alg.init(jax.random.key(0), shards), jax.jit(alg.round)
        for r in range(3):
            state = fn(state, shards, jax.random.key(r))[0]
        out.append(alg.global_params(state))
    jax.tree.map(np.testing.assert_array_equal, out[0], out[1])
    jax.tree.map(np.testing.assert_array_equal, out[2]["out"],
                 alg.global_params(alg.init(jax.random.key(0), shards))["out"])
    body = lambda p: p["hidden_layers_0"]["kernel"]
    assert np.abs(body(out[2]) - body(out[1])).max() > 1e-4


def test_personal_heads_beat_fedavg_on_two_label_clients():
    """digits, 2 labels per client (shards=2), 20 clients, 10 rounds: FedPer's personalized
    accuracy (each client with its own head) beats FedAvg's global model, which is FedPer with
    personal_head=False (same seeds, setup and model)."""
    data = fl.data.load("digits:shards=2,clients=20", seed=0)
    model = fl.models.get("mlp", 10, data.x[:1], hidden=(32,))
    setup = fl.Setup.of(clients_per_round=10, local_steps=10, batch_size=16, client_lr=0.05)
    acc = {}
    for on in (True, False):
        h = fl.run(fedper(model, personal_head=on, setup=setup), data, rounds=10, key=0,
                   eval_every=10, progress=False).history[-1]
        acc[on] = h["test_personal_accuracy"] if on else h["test_accuracy"]
    print(acc)
    assert acc[True] > acc[False] + 0.1


def test_bad_input():
    with pytest.raises(ValueError, match="model 'logistic' is all head"):
        fedper(fl.models.logistic(10))
    with pytest.raises(ValueError, match="model must have a features / head split"):
        fedper(fl.models.get("char_rnn", 10) if "char_rnn" in fl.models.MODELS
               else fl.models.quadratic(3))
    with pytest.raises(ValueError, match="personal_head must be one of"):
        fedper(fl.models.mlp(10), personal_head="yes")
