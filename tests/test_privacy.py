"""DP-FedAvg (aggregators/privacy.py): the clipping bound and the noise's std on stacked updates; one round
against a per-client numpy loop (fixed clipping through the Setup's aggregator, adaptive clipping);
epsilon equal to dp-accounting's own value (RDP without replacement, RDP and PLD Poisson) and in
metrics.jsonl; bad input; accuracy falling as z grows (slow)."""
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import Cohort, LocalWork, Optimizer, Setup, aggregators, models, run
from fedjax_lab import data as D
from fedjax_lab.algorithms import ditto, fedavg
from fedjax_lab.aggregators import privacy
from fedjax_lab.core import driver
from fedjax_lab.core.rounds import participate
from tests.reference import softmax_grads

dpa = pytest.importorskip("dp_accounting")


def stacked(seed=0, C=7):
    """A stacked update pytree [C, ...] whose rows have norms from ~0.05 to ~5."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(0.01, 1.0, C)
    return {"a": jnp.asarray(rng.normal(size=(C, 3, 4)) * scales[:, None, None], jnp.float32),
            "b": jnp.asarray(rng.normal(size=(C, 5)) * scales[:, None], jnp.float32)}


def row_norms(u):
    return np.sqrt(sum(np.sum(np.asarray(x, np.float64).reshape(x.shape[0], -1) ** 2, 1)
                       for x in jax.tree.leaves(u)))


def test_every_clipped_update_has_norm_at_most_S():
    u, S = stacked(), 0.8
    clipped, norms = privacy.clip_updates(u, S)
    before, after = row_norms(u), row_norms(clipped)
    np.testing.assert_allclose(norms, before, rtol=1e-5)
    assert (before > S).sum() >= 3 and (before < S).sum() >= 2     # both kinds present
    assert np.all(after <= S * (1 + 1e-6))
    np.testing.assert_allclose(after[before > S], S, rtol=1e-5)     # long ones land on the sphere
    for name in u:   # short ones untouched, long ones only rescaled (same direction)
        x, c = np.asarray(u[name]), np.asarray(clipped[name])
        np.testing.assert_array_equal(c[before <= S], x[before <= S])
        ratio = (before[before > S] / S).reshape((-1,) + (1,) * (x.ndim - 1))
        np.testing.assert_allclose(c[before > S] * ratio, x[before > S], rtol=1e-5, atol=1e-7)


def test_noise_std_is_z_S_over_m_and_absent_clients_leave_the_sum():
    # 6,012 noise coordinates per draw: the std's relative standard error is 1 / sqrt(2 n) ~ 0.9%,
    # so 4% is > 4 standard errors
    rng = np.random.default_rng(1)
    u = {"a": jnp.asarray(rng.normal(size=(7, 3, 4)), jnp.float32),
         "b": jnp.asarray(rng.normal(size=(7, 6000)) * 0.02, jnp.float32)}
    S, z, m = 0.8, 1.7, 10
    w = jnp.array([3.0, 0.0, 1.0, 2.0, 5.0, 0.0, 1.0])      # two absent clients (weight 0)
    agg = aggregators.dp_mean(noise_multiplier=z, clip_norm=S, expected_clients=m)
    clipped = jax.tree.map(np.asarray, privacy.clip_updates(u, S)[0])
    present = np.asarray(w) > 0
    expected = {k: v[present].sum(0) / m for k, v in clipped.items()}   # every weight counts 1
    noise_of = lambda out: np.concatenate([(np.asarray(out[k]) - expected[k]).ravel() for k in u])
    k1, k2 = jax.random.split(jax.random.key(0))
    noise = noise_of(agg(u, w, k1))
    assert abs(noise.std() / (z * S / m) - 1) < 0.04
    assert abs(noise.mean()) < 4 * z * S / m / math.sqrt(noise.size)
    # another key, other noise; the same key, the same noise
    assert abs(np.corrcoef(noise, noise_of(agg(u, w, k2)))[0, 1]) < 0.05
    np.testing.assert_array_equal(noise_of(agg(u, w, k1)), noise)
    # z = 0: exactly the clipped sum over m
    exact = aggregators.dp_mean(0.0, S, expected_clients=m)(u, w, k1)
    np.testing.assert_allclose(exact["b"], expected["b"], rtol=1e-6, atol=1e-7)


def tiny_data():
    return D.synthetic(1, 1, num_clients=8, seed=3, max_size=30, min_size=8)


def reference_round(d, params, part, key, *, lr, S, z_update, m, drop_stragglers=True,
                    clip_norm_of_round=None):
    """Per-client numpy loop: local SGD, clip each update to S, sum the present clients' updates,
    add z S xi (xi drawn from fold_in(key, 0xD1F), one split key per leaf in tree order: bias then
    kernel), divide by m, server SGD at lr 1."""
    x, y = np.asarray(d.x, np.float64), np.asarray(d.y)
    Wt, bt = (np.asarray(params["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
    idx, mask = np.asarray(part.batches.idx), np.asarray(part.batches.step_mask)
    sW, sb, norms, present = np.zeros_like(Wt), np.zeros_like(bt), [], []
    for c in range(len(part.ids)):
        W, b = Wt.copy(), bt.copy()
        for s in np.flatnonzero(mask[c]):
            gW, gb = softmax_grads(W, b, x[idx[c, s]], y[idx[c, s]])
            W, b = W - lr * gW, b - lr * gb
        uW, ub = W - Wt, b - bt
        norm = math.sqrt(np.sum(uW ** 2) + np.sum(ub ** 2))
        scale = min(1.0, S / norm)
        out = mask[c].sum() == 0 or (drop_stragglers and bool(part.is_straggler[c]))
        norms.append(norm)
        present.append(not out)
        if not out:
            sW, sb = sW + scale * uW, sb + scale * ub
    k_bias, k_kernel = jax.random.split(jax.random.fold_in(key, 0xD1F), 2)
    nb = np.asarray(jax.random.normal(k_bias, bt.shape), np.float64)
    nW = np.asarray(jax.random.normal(k_kernel, Wt.shape), np.float64)
    W1 = Wt + (sW + z_update * S * nW) / m
    b1 = bt + (sb + z_update * S * nb) / m
    return W1, b1, np.array(norms), np.array(present)


LR, C = 0.1, 5
SHARED = dict(cohort=Cohort(C, weighting="uniform"), client_opt=Optimizer("sgd", lr=LR),
              work=LocalWork(batch_size=5, local_steps=4, stragglers=0.4))


@functools.lru_cache(maxsize=None)
def fixed_alg(z=0.7, S=0.9, delta=1e-4):
    """FedAvg + dp_mean, one object per configuration (the driver compiles once per object)."""
    return fedavg(models.logistic(10), setup=Setup(aggregator=aggregators.dp_mean(z, S, delta=delta),
                                                   **SHARED))


def participation(alg, d, key):
    return jax.jit(participate, static_argnums=(2, 3))(jax.random.split(key)[0], d,
                                                       alg.setup.cohort, alg.setup.work)


def test_fixed_clipping_round_matches_per_client_loop():
    # fedavg drops stragglers: they leave the sum, m stays the cohort's C
    d, z, S = tiny_data(), 0.7, 0.9
    alg = fixed_alg(z, S)
    state = alg.init(jax.random.key(0), d)
    params = jax.tree.map(np.asarray, state.params)
    k = jax.random.key(11)
    new, metrics = driver.run_rounds(alg, state, d, k, jnp.int32(0), 1)   # round key fold_in(k, 1)
    key = jax.random.fold_in(k, 1)
    part = participation(alg, d, key)
    W, b, norms, present = reference_round(d, params, part, key, lr=LR, S=S, z_update=z, m=C)
    assert (~present).any() and (norms[present] > S).any() and (norms[present] < S).any()
    np.testing.assert_allclose(new.params["Dense_0"]["kernel"], W, atol=1e-5)
    np.testing.assert_allclose(new.params["Dense_0"]["bias"], b, atol=1e-5)
    assert metrics["clients_aggregated"][0] == present.sum()


def test_adaptive_clipping_round_matches_per_client_loop():
    d = tiny_data()
    S0, z, sigma_b, gamma, eta = 0.7, 0.7, 1.5, 0.5, 0.2
    base = fedavg(models.logistic(10), setup=Setup(aggregator=aggregators.dp_mean(z, S0), **SHARED))
    alg = privacy.adaptive_clipping(base, target_quantile=gamma, clip_lr=eta, count_stddev=sigma_b)
    key = jax.random.key(4)
    round_fn = jax.jit(alg.round)
    # a second round from S_1 (the clip norm is state), then compare that round
    state, _ = round_fn(alg.init(jax.random.key(0), d), d, jax.random.key(3))
    S1 = float(state.clip_norm)
    assert S1 != S0
    new, metrics = round_fn(state, d, key)
    part = participation(base, d, key)
    z_update = (z ** -2 - (2 * sigma_b) ** -2) ** -0.5
    W, b, norms, present = reference_round(d, state.inner.params, part, key, lr=LR, S=S1,
                                           z_update=z_update, m=C)
    assert (norms[present] > S1).any() and (norms[present] < S1).any()
    np.testing.assert_allclose(new.inner.params["Dense_0"]["kernel"], W, atol=1e-5)
    np.testing.assert_allclose(new.inner.params["Dense_0"]["bias"], b, atol=1e-5)
    count_noise = float(jax.random.normal(jax.random.fold_in(key, 0xD20)))
    b_tilde = (np.sum(norms[present] <= S1) + sigma_b * count_noise) / C
    np.testing.assert_allclose(metrics["unclipped_fraction"], b_tilde, rtol=1e-5)
    np.testing.assert_allclose(metrics["clip_norm"], S1, rtol=1e-6)
    np.testing.assert_allclose(new.clip_norm, S1 * math.exp(-eta * (b_tilde - gamma)), rtol=1e-5)


@pytest.mark.slow    # ~9 s of compilation: the same skeleton step as the tests above
def test_dp_mean_composes_with_ditto():
    # the same aggregator value in an algorithm with its own round around the skeleton (Ditto's
    # global model): with z = 0 the global step is the mean of C updates clipped to S (their norms
    # here are ~0.3-1.7 >> S), so its norm is at most S, and near S since they point roughly the
    # same way; the personal rows are Ditto's own and unclipped
    d, S = tiny_data(), 0.01
    alg = ditto(models.logistic(10), lam=0.1, setup=Setup(
        cohort=Cohort(4), work=LocalWork(batch_size=5, local_steps=4),
        client_opt=Optimizer("sgd", lr=0.1), aggregator=aggregators.dp_mean(0.0, S)))
    state = alg.init(jax.random.key(0), d)
    new, _ = jax.jit(alg.round)(state, d, jax.random.key(1))
    diff = lambda a, b: row_norms(jax.tree.map(lambda x, y: (x - y)[None], a, b))[0]
    assert 0.5 * S < diff(alg.global_params(new), alg.global_params(state)) <= S * (1 + 1e-5)
    assert max(row_norms(jax.tree.map(lambda a, b: a - b, new.rows, state.rows))) > 10 * S


def test_epsilon_equals_dp_accountings_own_value():
    N, C, z, T, delta = 100, 10, 1.1, 50, 1e-5
    wor = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    wor.compose(dpa.SelfComposedDpEvent(
        dpa.SampledWithoutReplacementDpEvent(N, C, dpa.GaussianDpEvent(z / 2)), T))
    poisson = dpa.rdp.RdpAccountant()
    poisson.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(C / N, dpa.GaussianDpEvent(z)), T))
    assert privacy.Accountant(z, N, C, delta).epsilon(T) == pytest.approx(wor.get_epsilon(delta), rel=1e-12)
    assert privacy.Accountant(z, N, C, delta, sampling="poisson").epsilon(T) == \
        pytest.approx(poisson.get_epsilon(delta), rel=1e-12)
    # more rounds, more epsilon; more noise, less; z = 0 is no privacy at all
    acc = privacy.Accountant(z, N, C, delta)
    assert acc.epsilon(10) < acc.epsilon(T) and privacy.Accountant(2 * z, N, C, delta).epsilon(T) < acc.epsilon(T)
    assert privacy.Accountant(0.0, N, C, delta).epsilon(1) == math.inf


def test_epsilon_in_metrics_jsonl_every_evaluation(tmp_path):
    d, z, delta = tiny_data(), 0.7, 1e-4
    alg = fixed_alg(z, 0.9, delta)       # the reference test's object: its rounds are compiled
    res = run(alg, d, rounds=2, key=0, eval_every=1, out=str(tmp_path), progress=False)
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    own = privacy.Accountant(z, d.num_clients, C, delta)
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["epsilon"] == own.epsilon(r["round"]) and r["delta"] == delta
    assert rows[0]["epsilon"] < rows[1]["epsilon"]
    assert res.history == rows
    # an algorithm without dp_mean reports no epsilon; accountant=False turns it off
    assert privacy.accountant_for(fedavg(models.logistic(10), setup=Setup(cohort=Cohort(C))), d) is None
    again = run(alg, d, rounds=1, key=0, eval_every=1, progress=False, accountant=False).history
    assert "epsilon" not in again[0] and again[0]["test_loss"] == rows[0]["test_loss"]


def test_dp_mean_from_flat_names_and_back():
    # the CLI's --aggregator dp_mean --aggregator-noise-multiplier 2 ...; config.json reads back
    agg = Setup.of(aggregator="dp_mean", aggregator_noise_multiplier=2.0,
                   aggregator_clip_norm=0.3).over(Setup()).aggregator
    assert isinstance(agg, privacy.DPMean) and (agg.noise_multiplier, agg.clip_norm) == (2.0, 0.3)
    desc = agg.describe()
    assert desc == {"aggregator": "dp_mean", "aggregator_noise_multiplier": 2.0,
                    "aggregator_clip_norm": 0.3, "aggregator_expected_clients": 0,
                    "aggregator_delta": 1e-5, "aggregator_sampling": "without_replacement",
                    "aggregator_accountant": "rdp"}
    opts = {k[len("aggregator_"):]: v for k, v in desc.items() if k != "aggregator"}
    assert aggregators.get("dp_mean", **opts).describe() == desc
    assert [o for o, _, _ in aggregators.options("dp_mean")] == list(opts)


@pytest.mark.parametrize("kwargs, name", [
    (dict(noise_multiplier=-0.1), "noise_multiplier"), (dict(clip_norm=0.0), "clip_norm"),
    (dict(clip_norm=-1.0), "clip_norm"), (dict(delta=0.0), "delta"), (dict(delta=1.0), "delta"),
    (dict(delta=float("nan")), "delta"), (dict(sampling="replacement"), "sampling"),
    (dict(accountant="moments"), "accountant"), (dict(expected_clients=-1), "expected_clients"),
    (dict(accountant="pld"), "pld")])
def test_bad_dp_mean_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        aggregators.dp_mean(**kwargs)
    if "accountant" not in kwargs and "sampling" not in kwargs:   # the same from the registry
        with pytest.raises(ValueError, match=name):
            aggregators.get("dp_mean", **kwargs)


def test_bad_accountant_and_adaptive_input():
    for kwargs, name in [(dict(noise_multiplier=-1.0), "noise_multiplier"), (dict(delta=1.5), "delta"),
                         (dict(clients_per_round=11), "clients_per_round"),
                         (dict(sampling="poissonian"), "sampling")]:
        args = {**dict(noise_multiplier=1.0, num_clients=10, clients_per_round=2), **kwargs}
        with pytest.raises(ValueError, match=name):
            privacy.Accountant(**args)
    setup = lambda agg: Setup(cohort=Cohort(4), aggregator=agg)
    with pytest.raises(ValueError, match="expected_clients"):
        fedavg(models.logistic(10), setup=setup(aggregators.dp_mean(1.0, 1.0, expected_clients=5)))
    dp = fedavg(models.logistic(10), setup=setup(aggregators.dp_mean(1.0, 1.0)))
    with pytest.raises(ValueError, match="count_stddev"):      # sigma_b = m / 20 = 0.2 < z / 2
        privacy.adaptive_clipping(dp)
    with pytest.raises(ValueError, match="target_quantile"):
        privacy.adaptive_clipping(dp, target_quantile=1.5, count_stddev=1.0)
    with pytest.raises(ValueError, match="clip_lr"):
        privacy.adaptive_clipping(dp, clip_lr=-0.1, count_stddev=1.0)
    with pytest.raises(ValueError, match="dp_mean"):
        privacy.adaptive_clipping(fedavg(models.logistic(10), setup=setup(None)), count_stddev=1.0)
    with pytest.raises(ValueError, match="own round"):
        privacy.adaptive_clipping(ditto(models.logistic(10), setup=setup(aggregators.dp_mean())),
                                  count_stddev=1.0)
    size = fedavg(models.logistic(10), setup=Setup(cohort=Cohort(4, sampling="size"),
                                                   aggregator=aggregators.dp_mean()))
    with pytest.raises(ValueError, match="sampling"):
        run(size, tiny_data(), rounds=1, key=0, progress=False)
    with pytest.raises(ValueError, match="needs the round key|round key"):
        aggregators.dp_mean()(stacked(), jnp.ones(7))


@pytest.mark.slow
def test_pld_epsilon_equals_dp_accountings_own_value():
    N, C, z, T, delta = 100, 10, 1.1, 5, 1e-5
    pld = dpa.pld.PLDAccountant()
    pld.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(C / N, dpa.GaussianDpEvent(z)), T))
    assert privacy.Accountant(z, N, C, delta, sampling="poisson", method="pld").epsilon(T) == \
        pytest.approx(pld.get_epsilon(delta), rel=1e-12)


@pytest.mark.slow
def test_accuracy_falls_as_noise_grows():
    # digits, 100 clients, 20 per round, 60 rounds; the ablation is z = 0 (clipping only)
    from experiments.reproduce.dpfedavg import accuracies
    acc = accuracies(noise_multipliers=(0.0, 1.0, 4.0, 16.0), seeds=(0,))
    print(acc)
    a = [acc[z] for z in (0.0, 1.0, 4.0, 16.0)]
    assert a[0] > 0.8 and a[0] >= a[1] - 0.02 and a[1] > a[2] > a[3] and a[0] - a[3] > 0.3
