"""IFCA (algorithms/ifca.py): a per-client reference loop over rounds with stragglers (cluster
estimates, training from the chosen model, averages within clusters), one cluster is FedAvg bit
for bit, the claim on planted label-permuted groups (purity, accuracy), bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lab as fl
from fedjax_lab.algorithms.ifca import ifca
from fedjax_lab.data.federated import federated_arrays
from tests.references.ifca import clusters_of, deployed, ifca_round


@pytest.fixture(scope="module")
def synth():
    return fl.data.load("synthetic:1,1,clients=8,dim=20,classes=5,min_size=10,max_size=30", seed=0)


def label_permuted(data, groups, seed=0):
    """`data` with client k's labels (train and test) mapped by permutation k mod groups (group 0:
    the identity): k planted groups that share inputs but not labels."""
    C = data.num_classes
    rng = np.random.default_rng(seed)
    perms = np.stack([np.arange(C)] + [rng.permutation(C) for _ in range(groups - 1)])
    relabel = lambda split: perms[np.asarray(split.client_ids()) % groups, np.asarray(split.y)]
    t = data.test
    test = federated_arrays(np.asarray(t.x), relabel(t), np.asarray(t.offsets), num_classes=C,
                            allow_empty=True, name="test split")
    return federated_arrays(np.asarray(data.x), relabel(data), np.asarray(data.offsets), test=test,
                            num_classes=C)


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_ifca_matches_a_per_client_reference_loop(synth, weighting):
    """Four rounds, 3 clusters, half the sampled clients straggling (dropped from the averages,
    their cluster estimate kept)."""
    alg = ifca(fl.models.logistic(5), num_clusters=3,
               setup=fl.Setup.of(clients_per_round=5, local_steps=4, batch_size=5, client_lr=0.2,
                                 stragglers=0.5, weighting=weighting))
    state = alg.init(jax.random.key(0), synth)
    thetas, rows = clusters_of(state), np.asarray(state.rows)
    fn = jax.jit(alg.round)
    for r in range(4):
        key = jax.random.key(10 + r)
        state, _ = fn(state, synth, key)
        thetas, rows = ifca_round(alg, synth, thetas, rows, key)
    np.testing.assert_array_equal(np.asarray(state.rows), rows)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5),
                 alg.client_params(state, jnp.arange(synth.num_clients)), deployed(thetas, rows))
    for j, (W, b) in enumerate(thetas):
        np.testing.assert_allclose(state.server.params["Dense_0"]["kernel"][j], W, rtol=1e-4,
                                   atol=1e-5)
    assert len(set(rows.tolist())) > 1                  # the clients did not all pick one cluster


def test_one_cluster_is_fedavg_bit_for_bit(synth):
    setup = fl.Setup.of(clients_per_round=4, local_steps=3, batch_size=5, client_lr=0.1)
    model = fl.models.logistic(5)
    out = []
    for alg in (ifca(model, num_clusters=1, setup=setup), fl.algorithms.fedavg(model, setup=setup)):
        state, fn = alg.init(jax.random.key(0), synth), jax.jit(alg.round)
        for r in range(3):
            state = fn(state, synth, jax.random.key(r))[0]
        out.append(alg.client_params(state, jnp.arange(synth.num_clients)))
    jax.tree.map(np.testing.assert_array_equal, out[0], out[1])


def test_ifca_recovers_planted_groups_and_beats_one_global_model():
    """digits iid over 16 clients, labels permuted in every other client (2 planted groups), all
    clients each round, 10 rounds: IFCA with k = 2 puts the groups in separate clusters (purity 1)
    and its clients' cluster models are far more accurate than one global model (k = 1, FedAvg)."""
    data = label_permuted(fl.data.load("digits:iid,clients=16", seed=0), 2)
    model = fl.models.get("logistic", 10, data.x[:1])
    setup = fl.Setup.of(clients_per_round=16, local_steps=10, batch_size=16, client_lr=0.05)
    groups = np.arange(16) % 2
    out = {}
    for k in (2, 1):
        r = fl.run(ifca(model, num_clusters=k, setup=setup), data, rounds=10, key=0,
                   eval_every=10, progress=False)
        rows = np.asarray(r.state.rows)
        purity = max(np.mean(rows == groups), np.mean(rows == 1 - groups))
        out[k] = (r.history[-1]["test_accuracy"], purity)
    print(out)
    assert out[2][1] == 1.0
    assert out[2][0] > out[1][0] + 0.15


def test_bad_input():
    for value in (0, 1.5, -1):
        with pytest.raises(ValueError, match="num_clusters"):
            ifca(fl.models.logistic(5), num_clusters=value)
