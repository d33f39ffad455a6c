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


def test_gaussian_is_a_fixed_scale_blind_to_the_real_update():
    """`gaussian` is Blanchard et al.'s fixed-scale noise, not Ditto's A2: the size of the real
    update does not move it (100x larger updates, same sent std)."""
    rng = np.random.default_rng(0)
    u = {"w": (100.0 * rng.normal(size=(6, 4000))).astype(np.float32)}
    got = np.asarray(attacks.apply_attack("gaussian", u, jnp.asarray(MASK), jax.random.key(3),
                                          scale=2.0)["w"])
    np.testing.assert_allclose(got[MASK].std(), 2.0, rtol=0.05)


# Real updates of very different sizes per client, and two leaves of different scales, so that
# "the std of the client's own update, all leaves together" differs from any per-leaf or
# per-round statistic. Clients 1 and 4 attack; their real updates are identical.
def _uneven_updates():
    rng = np.random.default_rng(7)
    size = np.array([0.5, 2.0, 1.0, 3.0, 2.0, 0.1], np.float32)[:, None]
    w = size * (rng.normal(size=(6, 3000)) + 3.0)              # offset: rms and sd differ by 1.3x
    b = 4.0 * size[:, :, None] * rng.normal(size=(6, 40, 25))    # 4x the spread of w
    w[4], b[4] = w[1], b[1]
    return {"w": w.reshape(6, 50, 60).astype(np.float32), "b": b.astype(np.float32)}


def test_random_update_is_dittos_a2_zero_mean_noise_of_the_real_updates_std():
    """A2 (Ditto, Li et al. 2021; the authors' `random_updates`): attacker k sends N(0, sd_k^2 I)
    with sd_k = np.std of its own flattened update. P = 4000 coordinates per client, so the sample
    std is within 4 / sqrt(2P) = 4.5% and the sample mean within 4 sd / sqrt(P) = 0.063 sd (4 sigma)."""
    u = _uneven_updates()
    attack = jax.jit(lambda u, m, k, s: attacks.apply_attack("random_update", u, m, k, scale=s))
    got = jax.tree.map(np.asarray, attack(u, jnp.asarray(MASK), jax.random.key(5), 1.0))
    flat = lambda t, k: np.concatenate([np.ravel(t["w"][k]), np.ravel(t["b"][k])])
    P = flat(u, 0).size
    for k in range(6):                                          # reference: one client at a time
        if not MASK[k]:
            for name in u:
                np.testing.assert_array_equal(got[name][k], u[name][k])   # benign: untouched
            continue
        sd = np.std(flat(u, k))                                 # the paper's (code's) sd_k
        sent = flat(got, k)
        assert abs(sent.mean()) < 4 * sd / np.sqrt(P)
        np.testing.assert_allclose(sent.std(), sd, rtol=4 / np.sqrt(2 * P))
        for name in u:                                          # one sd for every leaf
            leaf = np.ravel(got[name][k])
            np.testing.assert_allclose(leaf.std(), sd, rtol=4 / np.sqrt(2 * leaf.size))
    a, b = flat(got, 1), flat(got, 4)                           # same real update, own noise
    assert abs(np.corrcoef(a, b)[0, 1]) < 4 / np.sqrt(P)
    assert abs(np.corrcoef(a, flat(u, 1))[0, 1]) < 4 / np.sqrt(P)   # carries nothing of u_k
    twice = jax.tree.map(np.asarray, attack(u, jnp.asarray(MASK), jax.random.key(5), 2.0))
    np.testing.assert_allclose(flat(twice, 1), 2 * a, rtol=1e-5, atol=1e-6)


def test_random_update_is_registered_and_runs_through_the_adversary():
    assert "random_update" in attacks.ATTACKS and "random_update" in attacks.UPDATE_ATTACKS
    adv = attacks.Adversary("random_update", 0.4)
    u = _uneven_updates()
    got = np.asarray(jax.jit(lambda u, k: adv.corrupt(u, jnp.arange(6), 6, k))(u, jax.random.key(0))["w"])
    bad = np.asarray(attacks.malicious_clients(6, 0.4))
    for k in range(6):
        same = np.array_equal(got[k], u["w"][k])
        assert same != bad[k]


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
    from fedjax_lab import Setup, algorithms, models
    from fedjax_lab.core.rounds import participate
    opts = {"aggregator_beta": 0.2} if aggregator == "trimmed_mean" else {}
    alg = algorithms.fedavg(models.logistic(3), setup=Setup.of(
        client_lr=0.1, clients_per_round=5, local_steps=3, batch_size=4, aggregator=aggregator,
        attack=attack, attack_fraction=0.4, attack_scale=3.0, **opts))
    cohort, work = alg.setup.cohort, alg.setup.work
    malicious = np.asarray(attacks.malicious_clients(5, 0.4, seed=0))
    state = alg.init(jax.random.key(0), tiny_data)
    x, y = np.asarray(tiny_data.x, np.float64), np.asarray(tiny_data.y)
    for t in range(2):
        key = jax.random.key(30 + t)
        part = jax.jit(participate, static_argnums=(2, 3))(jax.random.split(key)[0], tiny_data,
                                                           cohort, work)
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
