"""Attacks against per-client references; attacker selection; label flipping; errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from fedjax_lab import attacks
from fedjax_lab.data import federated_arrays
from tests.reference import softmax_grads


def _updates(C=6):
    rng = np.random.default_rng(1)
    return {"w": rng.normal(size=(C, 2, 3)).astype(np.float32), "b": rng.normal(size=(C,)).astype(np.float32)}


MASK = np.array([False, True, False, False, True, False])


@pytest.mark.parametrize("name,scale,ref", [
    ("sign_flip", 1.0, lambda u: -u),
    ("sign_flip", 3.0, lambda u: -3.0 * u),
    ("scaled", 10.0, lambda u: 10.0 * u),
])
def test_simple_attacks_match_per_client_reference(name, scale, ref):
    u = _updates()
    got = jax.jit(lambda u, m, k: attacks.apply_attack(name, u, m, k, scale=scale))(
        u, jnp.asarray(MASK), jax.random.key(0))
    for leaf, g in zip(jax.tree.leaves(u), jax.tree.leaves(got)):
        for k in range(len(MASK)):     # reference: one client at a time
            want = ref(leaf[k]) if MASK[k] else leaf[k]
            np.testing.assert_allclose(g[k], want, rtol=1e-6)


def test_gaussian_replaces_only_attackers_with_noise_of_the_given_scale():
    u = {"w": np.zeros((6, 4000), np.float32)}
    got = attacks.apply_attack("gaussian", u, jnp.asarray(MASK), jax.random.key(3), scale=2.0)["w"]
    assert np.all(np.asarray(got)[~MASK] == 0)
    np.testing.assert_allclose(np.std(np.asarray(got)[MASK]), 2.0, rtol=0.05)


def test_alie_matches_reference():
    u = _updates()
    w = np.array([1, 1, 0, 1, 1, 1], np.float32)      # client 2 absent
    got = attacks.apply_attack("alie", u, jnp.asarray(MASK), jax.random.key(0), weights=jnp.asarray(w))
    n, f = 5, 2                                       # present clients, present attackers
    s = np.floor(n / 2 + 1) - f
    z = norm.ppf((n - s) / n)
    honest = [k for k in range(6) if w[k] > 0 and not MASK[k]]
    for leaf, g in zip(jax.tree.leaves(u), jax.tree.leaves(got)):
        H = np.stack([leaf[k] for k in honest])
        bad = H.mean(0) - z * H.std(0)
        for k in range(6):
            np.testing.assert_allclose(g[k], bad if MASK[k] else leaf[k], rtol=1e-5, atol=1e-6)


def test_attacker_selection_counts():
    m = attacks.malicious_clients(50, 0.2, seed=3)
    assert int(m.sum()) == 10
    assert np.array_equal(m, attacks.malicious_clients(50, 0.2, seed=3))
    s = attacks.sample_attackers(jax.random.key(0), 10, 0.3)
    assert int(s.sum()) == 3
    assert int(attacks.malicious_clients(10, 0.0).sum()) == 0


def test_flip_labels_only_touches_malicious_clients():
    y = np.array([0, 1, 2, 3, 0, 1, 2, 3, 4])
    data = federated_arrays(np.zeros((9, 2)), y, np.array([0, 3, 6, 9]), num_classes=5)
    out = jax.jit(attacks.flip_labels)(data, jnp.array([False, True, False]))
    np.testing.assert_array_equal(out.y, [0, 1, 2, 1, 4, 3, 2, 3, 4])


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"attack_fraction must lie in \[0, 1\)"):
        attacks.check_attack("sign_flip", 1.0)
    with pytest.raises(ValueError, match="attack_fraction"):
        attacks.check_attack("sign_flip", -0.1)
    with pytest.raises(ValueError, match="attack must be one of"):
        attacks.check_attack("backdoor", 0.1)
    with pytest.raises(ValueError, match="needs an attack"):
        attacks.check_attack("none", 0.2)
    with pytest.raises(ValueError, match="attack_scale"):
        attacks.check_attack("scaled", 0.2, -1.0)
    attacks.check_attack("alie", 0.0)


# ---- FedAvg composed with an attack and a robust aggregator, against a per-client loop ---------

def _local_sgd(W, b, x, y, idx, mask, lr, flip, num_classes):
    for s in range(idx.shape[0]):
        if not mask[s]:
            continue
        xb, yb = x[idx[s]], y[idx[s]]
        if flip:
            yb = num_classes - 1 - yb
        gW, gb = softmax_grads(W, b, xb, yb)
        W, b = W - lr * gW, b - lr * gb
    return W, b


@pytest.mark.parametrize("attack,aggregator,ref_agg", [
    ("sign_flip", "median", lambda M: np.median(M, 0)),
    ("label_flip", "trimmed_mean", lambda M: np.sort(M, 0)[1:4].mean(0)),   # 5 clients, beta 0.2
])
def test_fedavg_with_attack_and_aggregator_matches_reference(attack, aggregator, ref_agg, tiny_data):
    from fedjax_lab import algorithms, models
    from fedjax_lab.core.rounds import LocalWork, participate
    alg = algorithms.fedavg(models.logistic(3), client_lr=0.1, clients_per_round=5, local_steps=3,
                            batch_size=4, aggregator=aggregator, trim_beta=0.2, attack=attack,
                            attack_fraction=0.4, attack_scale=3.0)
    work = LocalWork(clients_per_round=5, local_steps=3, batch_size=4)
    malicious = np.asarray(attacks.malicious_clients(5, 0.4, seed=0))
    state = alg.init(jax.random.key(0), tiny_data)
    x, y = np.asarray(tiny_data.x, np.float64), np.asarray(tiny_data.y)
    for t in range(2):
        key = jax.random.key(30 + t)
        part = jax.jit(participate, static_argnums=2)(jax.random.split(key)[0], tiny_data, work)
        W0 = np.asarray(state.params["Dense_0"]["kernel"], np.float64)
        b0 = np.asarray(state.params["Dense_0"]["bias"], np.float64)
        dW, db = [], []
        for c, i in enumerate(np.asarray(part.ids)):          # reference loop over clients
            W, b = _local_sgd(W0, b0, x, y, np.asarray(part.batches.idx[c]),
                              np.asarray(part.batches.step_mask[c]), 0.1,
                              flip=attack == "label_flip" and malicious[i], num_classes=3)
            s = -3.0 if attack == "sign_flip" and malicious[i] else 1.0
            dW.append(s * (W - W0)); db.append(s * (b - b0))
        state, _ = jax.jit(alg.round)(state, tiny_data, key)
        np.testing.assert_allclose(state.params["Dense_0"]["kernel"], W0 + ref_agg(np.stack(dW)),
                                   atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(state.params["Dense_0"]["bias"], b0 + ref_agg(np.stack(db)),
                                   atol=1e-5, rtol=1e-5)
    assert malicious.sum() == 2
