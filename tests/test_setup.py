"""The shared values (core/setup.py): validation written once, self-description, flat names,
algorithm defaults, and hyperparameters that can be traced (a vmapped sweep)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab import aggregators, algorithms, attacks, models
from fedjax_lab.core.setup import Cohort, LocalWork, Optimizer, Setup


@pytest.mark.parametrize("make,match", [
    (lambda: Cohort(clients_per_round=0), "clients_per_round must be > 0"),
    (lambda: Cohort(sampling="fancy"), "sampling must be one of"),
    (lambda: Cohort(weighting="votes"), "weighting must be one of"),
    (lambda: LocalWork(batch_size=0), "batch_size"),
    (lambda: LocalWork(local_steps=2.5), "local_steps must be a positive integer"),
    (lambda: LocalWork(epochs=0), "epochs"),
    (lambda: LocalWork(stragglers=1.5), r"stragglers must lie in \[0, 1\]"),
    (lambda: LocalWork(shuffle="twice"), "shuffle must be one of"),
    (lambda: Optimizer("adamw"), "optimizer must be one of"),
    (lambda: Optimizer("sgd", lr=-1.0), "lr must be > 0"),
    (lambda: Optimizer("adam", lr=0.1, b1=1.0), "b1"),
    (lambda: aggregators.trimmed_mean(beta=0.5), "beta must lie in"),
    (lambda: aggregators.krum(f=-1), "f .*must be an integer >= 0"),
    (lambda: aggregators.norm_clip(clip_norm=0.0), "clip_norm"),
    (lambda: aggregators.get("mode"), "aggregator must be one of"),
    (lambda: aggregators.get("median", beta=0.1), "has no option"),
    (lambda: attacks.Adversary("sign_flip", fraction=1.0), "attack_fraction"),
    (lambda: Setup(cohort=3), "Setup.cohort must be a"),
    (lambda: Setup.of(clients=3), "unknown name"),
])
def test_bad_values_fail_when_built_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_setup_of_flat_names_lands_on_top_of_the_algorithm_defaults():
    s = Setup.of(server_lr=0.05, clients_per_round=4, aggregator="trimmed_mean",
                 aggregator_beta=0.2, attack="sign_flip", attack_fraction=0.25)
    adam = Setup(server_opt=Optimizer("adam", lr=0.01))
    r = s.over(adam)
    assert r.server_opt.name == "adam" and r.server_opt.lr == 0.05      # kept Adam, changed lr
    assert r.cohort.clients_per_round == 4 and r.cohort.sampling == "uniform"
    assert r.aggregator.name == "trimmed_mean" and dict(r.aggregator.options) == {"beta": 0.2}
    assert r.attack.attack == "sign_flip" and r.attack.fraction == 0.25
    flat = r.describe()
    assert flat["server_optimizer"] == "adam" and flat["aggregator_beta"] == 0.2
    assert flat["clients_per_round"] == 4 and flat["attack_fraction"] == 0.25
    # describe -> of -> describe is the identity: a config re-builds the same setup.
    assert Setup.of(**flat).over(Setup()).describe() == flat


def test_custom_optimizers_are_recorded_distinguishably():
    a = Optimizer.of(optax.adamw(1e-3, weight_decay=0.1)).describe("client")
    b = Optimizer.of(optax.adamw(1e-3, weight_decay=0.2)).describe("client")
    c = Optimizer.of(optax.adamw(1e-3, weight_decay=0.1)).describe("client")
    assert a["client_optimizer"].startswith("custom:")
    assert a != b and a == c


def test_factories_record_their_config_from_the_values(tiny_data):
    m = models.logistic(3)
    alg = algorithms.fedprox(m, mu=0.3, setup=Setup.of(clients_per_round=4, stragglers=0.5,
                                                        aggregator="median"))
    cfg = alg.config
    assert cfg["algorithm"] == "fedprox" and cfg["mu"] == 0.3
    assert cfg["clients_per_round"] == 4 and cfg["stragglers"] == 0.5
    assert cfg["aggregator"] == "median" and cfg["drop_stragglers"] is False   # FedProx keeps them


def test_vmap_of_fedprox_round_over_mu_and_seeds_equals_the_separate_rounds(tiny_data):
    """Float hyperparameters may be traced: one program for 3 values of mu x 2 seeds."""
    model = models.logistic(3)
    setup = Setup.of(clients_per_round=3, local_steps=4, batch_size=4, client_lr=0.1,
                     stragglers=0.4)
    data = tiny_data
    mus = jnp.array([0.0, 0.5, 2.0])
    seeds = jnp.array([0, 1])

    def one(mu, seed):
        alg = algorithms.fedprox(model, mu=mu, setup=setup)
        key = jax.random.key(seed)
        state = alg.init(jax.random.fold_in(key, 0), data)
        state, metrics = alg.round(state, data, jax.random.fold_in(key, 1))
        return state.params, metrics["local_objective"]

    grid = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None)))
    params, objective = grid(mus, seeds)
    for i, mu in enumerate([0.0, 0.5, 2.0]):
        for j, seed in enumerate([0, 1]):
            p, o = jax.jit(lambda: one(mu, seed))()
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i, j], b, rtol=1e-6, atol=1e-7),
                         params, p)
            np.testing.assert_allclose(objective[i, j], o, rtol=1e-6)
    # mu matters: the sweep's rows differ (a sweep that ignored mu would pass the loop above).
    assert not np.allclose(params["Dense_0"]["kernel"][0], params["Dense_0"]["kernel"][2])


def test_client_chunk_gives_the_unchunked_round_and_refuses_whole_stack_aggregators(tiny_data):
    """LocalWork(client_chunk=k) trains k clients at a time and accumulates the weighted mean."""
    model = models.logistic(3)
    flat = dict(clients_per_round=5, local_steps=4, batch_size=4, client_lr=0.1, stragglers=0.4)
    out = []
    for chunk in (None, 2, 5):
        alg = algorithms.fedprox(model, mu=0.3, setup=Setup.of(client_chunk=chunk, **flat))
        state = alg.init(jax.random.key(0), tiny_data)
        state, metrics = jax.jit(alg.round)(state, tiny_data, jax.random.key(1))
        out.append((state.params, metrics))
    for params, metrics in out[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     params, out[0][0])
        for k in ("local_loss", "local_objective", "clients_aggregated", "bytes_up"):
            np.testing.assert_allclose(metrics[k], out[0][1][k], rtol=1e-5)
    with pytest.raises(ValueError, match="client_chunk=2 .*aggregator 'mean'"):
        algorithms.fedavg(model, setup=Setup.of(client_chunk=2, aggregator="median"))
    with pytest.raises(ValueError, match="client_chunk must be > 0"):
        LocalWork(client_chunk=0)
