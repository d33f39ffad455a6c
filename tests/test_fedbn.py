"""FedBN (algorithms/fedbn.py): a per-client reference loop over rounds with stragglers, the
shared-BatchNorm ablation (FedAvg bit for bit), the claim on a feature shift, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lab as fl
from tests.references.fedbn import fedbn_round, local_part, start


@pytest.fixture(scope="module")
def shifted():
    return fl.data.load("digits:iid,clients=8,domains=4", seed=0)


def small_mlp_bn(data):
    return fl.models.get("mlp_bn", 10, data.x[:1], hidden=(8, 6))


def test_fedbn_matches_a_per_client_reference_loop(shifted):
    """Three rounds, half the sampled clients straggling (dropped), rows carried across rounds."""
    model = small_mlp_bn(shifted)
    alg = fl.algorithms.fedbn(model, setup=fl.Setup.of(clients_per_round=4, local_steps=3,
                                                       batch_size=5, client_lr=0.1, stragglers=0.5))
    state = alg.init(jax.random.key(0), shifted)
    w = jax.tree.map(np.asarray, alg.global_params(state))
    rows = [local_part(w)] * shifted.num_clients
    fn = jax.jit(alg.round)
    for r in range(3):
        key = jax.random.key(10 + r)
        state, metrics = fn(state, shifted, key)
        w, rows = fedbn_round(alg, shifted, w, rows, key)
    check = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5)   # float32 vs 64
    jax.tree.map(check, alg.global_params(state), w)
    deployed = alg.client_params(state, jnp.arange(shifted.num_clients))
    jax.tree.map(check, deployed, jax.tree.map(lambda *a: np.stack(a), *[start(w, r) for r in rows]))
    moved = [k for k in range(shifted.num_clients)
             if np.abs(rows[k]["batch_stats"]["norms_0"]["mean"]).max() > 0]
    assert 0 < len(moved) < shifted.num_clients          # some clients trained, some did not yet
    shared = \
        sum(int(np.size(v)) * 4 for k, sub in w["params"].items() if not k.startswith("norms_")
            for v in jax.tree.leaves(sub))
    assert float(metrics["bytes_up_per_client"]) == shared == float(metrics["bytes_down_per_client"])


def test_shared_batch_norm_is_fedavg_bit_for_bit(shifted):
    model = small_mlp_bn(shifted)
    setup = fl.Setup.of(clients_per_round=4, local_steps=3, batch_size=5, client_lr=0.1)
    out = []
    for alg in (fl.algorithms.fedbn(model, local_bn=False, setup=setup),
                fl.algorithms.fedavg(model, setup=setup)):
        state, fn = alg.init(jax.random.key(0), shifted), jax.jit(alg.round)
        for r in range(3):
            state = fn(state, shifted, jax.random.key(r))[0]
        out.append(alg.global_params(state))
    jax.tree.map(np.testing.assert_array_equal, out[0], out[1])


def test_local_batch_norm_beats_fedavg_under_feature_shift():
    """Four input domains (contrast and brightness per domain, labels iid), 15 rounds: FedBN's
    clients, each with its own BatchNorm layers, are more accurate than FedAvg's shared model,
    which is FedBN with local_bn=False (same seeds, setup and model)."""
    data = fl.data.load("digits:iid,clients=12,domains=4", seed=0)
    model = fl.models.get("mlp_bn", 10, data.x[:1], hidden=(32,))
    setup = fl.Setup.of(clients_per_round=12, local_steps=5, batch_size=16, client_lr=0.05)
    acc = {}
    for local_bn in (True, False):
        h = fl.run(fl.algorithms.fedbn(model, local_bn=local_bn, setup=setup), data, rounds=15,
                   key=0, eval_every=15, progress=False).history[-1]
        acc[local_bn] = h["test_personal_accuracy"] if local_bn else h["test_accuracy"]
    print(acc)
    assert acc[True] > acc[False] + 0.05


def test_bad_input():
    with pytest.raises(ValueError, match="model must have BatchNorm layers"):
        fl.algorithms.fedbn(fl.models.logistic(10))
    with pytest.raises(ValueError, match="local_bn must be one of"):
        fl.algorithms.fedbn(fl.models.mlp_bn(10), local_bn="yes")
