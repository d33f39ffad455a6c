"""Attacks against per-client references; attacker selection; label flipping; errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from fedjax_lab import attacks
from fedjax_lab.data import federated_arrays


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
