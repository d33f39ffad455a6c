"""Server optimizers against Reddi et al. (ICLR 2021) Algorithm 2 written out in numpy."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab import Setup, algorithms, models
from fedjax_lab.core.optimizers import OPTIMIZERS, make_optimizer

# Three rounds of server pseudo-updates Delta_t (the mean of w_k - w_t), two leaves. Chosen so
# Yogi's sign(v_{t-1} - Delta_t^2) is -1 on some coordinates and +1 on others, never near a tie
# (|Delta| = tau in round 1 would make the sign float noise).
DELTAS = [
    {"a": np.array([0.01, 0.0015, 0.1, 0.0]), "b": np.array([[-0.05, 0.0025], [0.3, -0.0004]])},
    {"a": np.array([-0.02, 0.0005, 0.001, 0.04]), "b": np.array([[0.01, -0.06], [0.001, 0.02]])},
    {"a": np.array([0.003, -0.01, 0.2, -0.0001]), "b": np.array([[0.0, 0.005], [-0.2, 0.07]])},
]
X0 = {"a": np.array([0.5, -1.0, 0.0, 2.0]), "b": np.array([[1.0, -0.5], [0.25, 0.0]])}


def paper_rule(rule, deltas, x0, *, eta, b1=0.9, b2=0.99, tau=1e-3):
    """Algorithm 2: x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau), m_{-1} = 0, v_{-1} = tau^2."""
    x = {k: np.asarray(v, np.float64).copy() for k, v in x0.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.full_like(val, tau ** 2) for k, val in x.items()}
    xs = []
    for delta in deltas:
        for k in x:
            d = delta[k]
            m[k] = b1 * m[k] + (1 - b1) * d
            if rule == "fedadagrad":
                v[k] = v[k] + d ** 2
            elif rule == "fedyogi":
                v[k] = v[k] - (1 - b2) * d ** 2 * np.sign(v[k] - d ** 2)
            else:
                v[k] = b2 * v[k] + (1 - b2) * d ** 2
            x[k] = x[k] + eta * m[k] / (np.sqrt(v[k]) + tau)
        xs.append({k: val.copy() for k, val in x.items()})
    return xs


def run_server(tx, deltas, x0):
    """What core.rounds.server_update does: the optimizer sees the pseudo-gradient -Delta_t."""
    params = {k: jnp.asarray(v, jnp.float32) for k, v in x0.items()}
    state = tx.init(params)
    xs = []
    for delta in deltas:
        g = {k: -jnp.asarray(d, jnp.float32) for k, d in delta.items()}
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        xs.append(params)
    return xs


@pytest.mark.parametrize("rule", ["fedadam", "fedyogi", "fedadagrad"])
def test_three_server_steps_follow_algorithm_2(rule):
    expected = paper_rule(rule, DELTAS, X0, eta=0.05, b1=0.8, b2=0.95, tau=2e-3)
    got = run_server(make_optimizer(rule, 0.05, eps=2e-3, b1=0.8, b2=0.95), DELTAS, X0)
    for t, (e, g) in enumerate(zip(expected, got)):
        for k in e:
            np.testing.assert_allclose(g[k], e[k], rtol=1e-6, atol=1e-6, err_msg=f"{rule} t={t}")
    # x moves by far more than the tolerance, so a wrong rule cannot pass
    assert np.abs(expected[-1]["a"] - X0["a"]).max() > 1e-2


@pytest.mark.parametrize("rule", ["fedadam", "fedyogi", "fedadagrad"])
def test_default_hyperparameters_are_reddi_et_al(rule):
    expected = paper_rule(rule, DELTAS, X0, eta=0.01, b1=0.9, b2=0.99, tau=1e-3)
    got = run_server(make_optimizer(rule, 0.01), DELTAS, X0)
    for k in X0:
        np.testing.assert_allclose(got[-1][k], expected[-1][k], rtol=1e-6, atol=1e-6)


def test_first_fedadagrad_step_is_the_papers_not_optax():
    """Issue 10: Delta = (0.01, 0.001, 0.1), eta = 0.01, tau = 1e-3, b1 = 0.9."""
    delta = [{"w": np.array([0.01, 0.001, 0.1])}]
    x0 = {"w": np.zeros(3)}
    paper = run_server(make_optimizer("fedadagrad", 0.01), delta, x0)[0]["w"]
    optax_variant = run_server(make_optimizer("adagrad", 0.01), delta, x0)[0]["w"]
    np.testing.assert_allclose(paper, [9.0e-4, 4.1e-4, 9.9e-4], rtol=0.02)
    # optax: 0.01 * Delta / sqrt(0.1 + Delta^2 + eps), no momentum
    np.testing.assert_allclose(optax_variant, [3.1e-4, 3.1e-5, 3.0e-3], rtol=0.02)
    np.testing.assert_allclose(optax_variant, 0.01 * delta[0]["w"] / np.sqrt(
        0.1 + delta[0]["w"] ** 2 + 1e-3), rtol=1e-5)


def test_adam_is_optax_bias_corrected_adam_not_fedadam():
    """Kingma & Ba's first step is eta m^ / (sqrt(v^) + eps) = eta Delta / (|Delta| + eps)."""
    d = np.array([0.01, 0.001, 0.1])
    got = run_server(make_optimizer("adam", 0.01), [{"w": d}], {"w": np.zeros(3)})[0]["w"]
    np.testing.assert_allclose(got, 0.01 * d / (np.abs(d) + 1e-3), rtol=1e-5)
    paper = run_server(make_optimizer("fedadam", 0.01), [{"w": d}], {"w": np.zeros(3)})[0]["w"]
    assert np.all(np.abs(paper - got) > 1e-4)    # no bias correction: the two differ at once


def test_every_named_optimizer_builds_and_steps():
    for name in OPTIMIZERS:
        got = run_server(make_optimizer(name, 0.01), DELTAS[:1], X0)[0]
        assert all(np.all(np.isfinite(v)) for v in got.values()), name


def test_sgd_momentum_unchanged():
    got = run_server(make_optimizer("sgd", 0.5, momentum=0.9), DELTAS[:2], X0)
    expected = {k: X0[k] + 0.5 * DELTAS[0][k] + 0.5 * (0.9 * DELTAS[0][k] + DELTAS[1][k])
                for k in X0}
    for k in X0:
        np.testing.assert_allclose(got[1][k], expected[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw, match", [
    (dict(name_or_tx="adamw"), r"server_optimizer must be one of .*'adam'"),
    (dict(b1=1.0), r"server_b1 must lie in \[0, 1\)"),
    (dict(b1=-0.1), r"server_b1 must lie in \[0, 1\)"),
    (dict(b2=1.0), r"server_b2 must lie in \[0, 1\)"),
    (dict(eps=0.0), r"server_eps must be > 0"),
    (dict(lr=0.0), r"server_lr must be > 0"),
])
def test_bad_arguments_name_themselves(kw, match):
    args = dict(name_or_tx="fedadam", lr=0.01) | kw
    with pytest.raises(ValueError, match=match):
        make_optimizer(args.pop("name_or_tx"), args.pop("lr"), arg="server_optimizer", **args)


def test_bad_server_optimizer_fails_in_the_factory():
    # Setup.of's errors name the Optimizer's field (optimizer, eps), not the flat name
    with pytest.raises(ValueError, match=r"(server_)?optimizer must be one of .*got 'reddi_adam'"):
        algorithms.fedopt(models.logistic(3), setup=Setup.of(server_optimizer="reddi_adam"))
    with pytest.raises(ValueError, match=r"(server_)?eps must be > 0, got -0\.001"):
        algorithms.fedadam(models.logistic(3), setup=Setup.of(server_eps=-1e-3))
