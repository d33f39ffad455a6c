"""FedDyn (algorithms/feddyn.py): a per-client reference loop with dropped stragglers, alpha = 0 is
FedAvg bit for bit, the quadratic claim (the global minimizer, where FedAvg stops short), bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lab as fl
from fedjax_lab.algorithms import fedavg, feddyn
from fedjax_lab.core.rounds import participate
from fedjax_lab.data import from_client_lists
from fedjax_lab.extend import Model
from reference import softmax_grads


def reference_rounds(data, alg, params, keys, *, eta, alpha):
    """FedDyn Algorithm 1 client by client in float64 numpy (participation, batches and step masks
    from `participate` with the round's key): client k takes SGD steps on
    L_k(theta) - <g_k, theta> + alpha/2 ||theta - theta^{t-1}||^2, then
    g_k <- g_k - alpha (theta_k - theta^{t-1}); h <- h - alpha/m sum_P (theta_k - theta^{t-1});
    theta <- (1/|P|) sum_P theta_k - h / alpha. Dropped stragglers are not in P."""
    X = np.asarray(data.x, np.float64).reshape(data.x.shape[0], -1)
    Y = np.asarray(data.y)
    theta = {k: np.asarray(v, np.float64) for k, v in params["Dense_0"].items()}
    h = {k: np.zeros_like(v) for k, v in theta.items()}
    g = [{k: np.zeros_like(v) for k, v in theta.items()} for _ in range(data.num_clients)]
    m = data.num_clients
    for key in keys:
        part = participate(jax.random.split(key)[0], data, alg.setup.cohort, alg.setup.work)
        ids, idx = np.asarray(part.ids), np.asarray(part.batches.idx)
        mask, straggler = np.asarray(part.batches.step_mask), np.asarray(part.is_straggler)
        models = []
        for k, steps, msk, s in zip(ids, idx, mask, straggler):
            if s or not msk.any():
                continue
            th = {n: v.copy() for n, v in theta.items()}
            for rows in steps[msk]:
                gW, gb = softmax_grads(th["kernel"], th["bias"], X[rows], Y[rows])
                for n, grad in (("kernel", gW), ("bias", gb)):
                    th[n] = th[n] - eta * (grad - g[k][n] + alpha * (th[n] - theta[n]))
            g[k] = {n: g[k][n] - alpha * (th[n] - theta[n]) for n in theta}
            models.append(th)
        for n in theta:
            h[n] = h[n] - alpha / m * sum(th[n] - theta[n] for th in models)
            theta[n] = np.mean([th[n] for th in models], 0) - h[n] / alpha
    return theta, h, g


def test_feddyn_matches_a_per_client_reference_loop(tiny_data):
    """Four rounds, half the sampled clients straggling and dropped (out of P_t: their g_k stay)."""
    alpha = 0.3
    setup = fl.Setup.of(clients_per_round=3, local_steps=4, batch_size=3, client_lr=0.2,
                        stragglers=0.5)
    alg = feddyn(fl.models.logistic(3), alpha=alpha, setup=setup)
    state = alg.init(jax.random.key(0), tiny_data)
    params0 = state.server.params
    keys = [jax.random.key(100 + r) for r in range(4)]
    round_fn = jax.jit(alg.round)
    for key in keys:
        state, metrics = round_fn(state, tiny_data, key)
    theta, h, g = reference_rounds(tiny_data, alg, params0, keys, eta=0.2, alpha=alpha)
    stragglers = [np.asarray(participate(jax.random.split(k)[0], tiny_data, alg.setup.cohort,
                                         alg.setup.work).is_straggler) for k in keys]
    assert 0 < np.sum(stragglers) < np.size(stragglers)
    for n in theta:
        np.testing.assert_allclose(state.server.params["Dense_0"][n], theta[n], rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(state.server.extra["Dense_0"][n], h[n], rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(state.rows["Dense_0"][n], np.stack([r[n] for r in g]),
                                   rtol=2e-5, atol=2e-6)
    assert np.abs(h["kernel"]).max() > 1e-3
    untouched = [k for k in range(tiny_data.num_clients) if not np.abs(g[k]["kernel"]).any()]
    assert 0 < len(untouched) < tiny_data.num_clients
    model_bytes = sum(4 * v.size for v in jax.tree.leaves(params0))
    assert float(metrics["bytes_up_per_client"]) == model_bytes       # theta_k - theta only
    assert float(metrics["bytes_down_per_client"]) == model_bytes     # h stays on the server


def test_alpha_zero_is_fedavg_bit_for_bit(tiny_data):
    """alpha = 0 (no regularizer, h = 0, h/alpha taken as 0) equals FedAvg with the paper's
    uniform average over three rounds; alpha > 0 does not. A traced alpha = 0 (the general
    program, with the regularizer's terms) is FedAvg to float rounding."""
    model = fl.models.logistic(3)
    flat = dict(clients_per_round=4, local_steps=3, batch_size=4, client_lr=0.1, weighting="uniform")
    kernels = {}
    for name, alg in (("off", feddyn(model, alpha=0.0, setup=fl.Setup.of(**flat))),
                      ("on", feddyn(model, alpha=0.1, setup=fl.Setup.of(**flat))),
                      ("avg", fedavg(model, setup=fl.Setup.of(**flat)))):
        state, fn = alg.init(jax.random.key(0), tiny_data), jax.jit(alg.round)
        for r in range(3):
            state = fn(state, tiny_data, jax.random.key(5 + r))[0]
            kernels[name, r] = np.asarray(alg.global_params(state)["Dense_0"]["kernel"])
    for r in range(3):
        np.testing.assert_array_equal(kernels["off", r], kernels["avg", r])
    assert np.abs(kernels["on", 2] - kernels["avg", 2]).max() > 1e-3

    def traced(alpha):    # the general program, alpha a tracer: h / alpha at alpha = 0 is 0, not NaN
        alg = feddyn(model, alpha=alpha, setup=fl.Setup.of(**flat))
        state = alg.init(jax.random.key(0), tiny_data)
        for r in range(2):
            state = alg.round(state, tiny_data, jax.random.key(5 + r))[0]
        return alg.global_params(state)["Dense_0"]["kernel"]
    np.testing.assert_allclose(jax.jit(traced)(jnp.float32(0.0)), kernels["avg", 1], rtol=1e-6,
                               atol=1e-6)


def curved_quadratic(dim: int) -> Model:
    """Per-example loss s/2 ||x - a||^2 of an example [a, s]: client k's curvature s_k."""
    return Model(init=lambda key, sample_x: {"x": jnp.zeros((dim,), jnp.float32)},
                 apply=lambda p, xb, *, train=False, rng=None:
                     jnp.sqrt(xb[:, -1:]) * (p["x"][None, :] - xb[:, :-1]),
                 loss=lambda z, y: 0.5 * jnp.sum(jnp.square(z), -1), name="curved_quadratic")


def test_feddyn_reaches_the_global_minimizer_and_fedavg_does_not():
    """L_k(x) = s_k/2 ||x - a_k||^2, s = (0.2, 1, 5), full participation, K = 20 local GD steps
    of lr eta = 0.1. The minimizer of sum_k L_k is sum s_k a_k / sum s_k. FedAvg's fixed point is
    sum w_k a_k / sum w_k with w_k = 1 - (1 - eta s_k)^K (closed form): it stops short. FedDyn
    reaches the minimizer (h = mean_k g_k forces sum_k grad L_k = 0 at a fixed point)."""
    centers = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    s = np.array([0.2, 1.0, 5.0])
    eta, K = 0.1, 20
    xs = [np.concatenate([c, [sk]])[None].astype(np.float32).repeat(2, 0) for c, sk in zip(centers, s)]
    data = from_client_lists(xs, [np.zeros(2, int)] * 3, num_classes=1)
    setup = fl.Setup.of(clients_per_round=3, local_steps=K, batch_size=2, client_lr=eta,
                        weighting="uniform")
    closed = lambda w: (w[:, None] * centers).sum(0) / w.sum()
    x_opt, x_avg = closed(s), closed(1 - (1 - eta * s) ** K)
    got = {}
    for name, alg in (("feddyn", feddyn(curved_quadratic(2), alpha=0.5, setup=setup)),
                      ("fedavg", fedavg(curved_quadratic(2), setup=setup))):
        res = fl.run(alg, data, rounds=150, key=0, eval_every=150, progress=False)
        got[name] = np.asarray(alg.global_params(res.state)["x"], np.float64)
    print({n: np.linalg.norm(g - x_opt) for n, g in got.items()}, np.linalg.norm(x_avg - x_opt))
    np.testing.assert_allclose(got["feddyn"], x_opt, atol=1e-5)
    np.testing.assert_allclose(got["fedavg"], x_avg, atol=1e-5)
    assert np.linalg.norm(x_avg - x_opt) > 0.3


def test_bad_input_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        feddyn(fl.models.logistic(3), alpha=-0.1)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        feddyn(fl.models.logistic(3), alpha=float("nan"))
