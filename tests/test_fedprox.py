"""FedProx's own part: the proximal term, and mu = 0 with stragglers kept."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import Setup, algorithms, models
from fedjax_lab.algorithms.fedprox import proximal_term


def test_proximal_term_and_its_gradient_follow_the_paper():
    w = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([[0.5]])}
    w_t = {"a": jnp.array([0.0, 1.0]), "b": jnp.array([[2.0]])}
    mu = 0.7
    value = proximal_term(mu)(w, w_t)
    np.testing.assert_allclose(value, 0.5 * mu * (1.0 + 9.0 + 2.25), rtol=1e-6)
    grad = jax.grad(lambda p: proximal_term(mu)(p, w_t))(w)
    jax.tree.map(lambda g, a, b: np.testing.assert_allclose(g, mu * (a - b), rtol=1e-6),
                 grad, w, w_t)


def test_mu_zero_is_fedavg_that_keeps_stragglers(tiny_data):
    """The paper's "FedProx (mu=0)": FedAvg's round with the stragglers' partial work kept;
    FedAvg by default drops them (round(0.5 * 4) = 2 of 4 aggregated)."""
    model = models.logistic(3)
    flat = dict(clients_per_round=4, local_steps=5, batch_size=4, client_lr=0.1, stragglers=0.5)
    prox = algorithms.fedprox(model, mu=0.0, setup=Setup.of(**flat))
    avg = algorithms.fedavg(model, setup=Setup.of(drop_stragglers=False, **flat))
    dropping = algorithms.fedavg(model, setup=Setup.of(**flat))
    out = {}
    for name, alg in (("prox", prox), ("avg", avg), ("dropping", dropping)):
        state = alg.init(jax.random.key(0), tiny_data)
        new, metrics = jax.jit(alg.round)(state, tiny_data, jax.random.key(3))
        out[name] = new.params
        assert float(metrics["clients_aggregated"]) == (2.0 if name == "dropping" else 4.0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 out["prox"], out["avg"])
    assert not np.allclose(out["prox"]["Dense_0"]["kernel"], out["dropping"]["Dense_0"]["kernel"])


def test_negative_mu_is_refused():
    with pytest.raises(ValueError, match="mu must be >= 0"):
        algorithms.fedprox(models.logistic(3), mu=-0.1)
