"""q-FFL / q-FedAvg (algorithms/qffl.py): a per-client float64 reference loop of Algorithm 3,
q = 0 is the uniform mean of the local models (FedAvg), the loss reweighting, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lab as fl
from fedjax_lab.algorithms import fedavg, qffl
from fedjax_lab.core.rounds import participate
from reference import softmax_grads


def ce(W, b, x, y):
    z = x @ W + b
    z = z - z.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))


def reference_rounds(data, alg, params, keys, *, lr, q, L):
    """q-FedAvg client by client in float64 numpy: F_k(w_t) = the mean loss at w_t over the
    batches of the client's real steps (+ 1e-10), w_bar_k by plain SGD, Delta_k, h_k of the paper,
    w <- w - sum p_k Delta_k / sum p_k h_k (p_k = 1 or n_k; 0 for dropped stragglers)."""
    X = np.asarray(data.x, np.float64).reshape(data.x.shape[0], -1)
    Y = np.asarray(data.y)
    W, b = (np.asarray(params["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
    uniform = alg.setup.cohort.weighting == "uniform"
    for key in keys:
        part = participate(jax.random.split(key)[0], data, alg.setup.cohort, alg.setup.work)
        ids, idx = np.asarray(part.ids), np.asarray(part.batches.idx)
        mask, straggler = np.asarray(part.batches.step_mask), np.asarray(part.is_straggler)
        n = np.asarray(part.num_examples, np.float64)
        sum_dW, sum_db, sum_h = 0.0, 0.0, 0.0
        for steps, m, s, n_k in zip(idx, mask, straggler, n):
            if s or not m.any():
                continue
            F = np.mean([ce(W, b, X[rows], Y[rows]) for rows in steps[m]]) + 1e-10
            Wk, bk = W.copy(), b.copy()
            for rows in steps[m]:
                gW, gb = softmax_grads(Wk, bk, X[rows], Y[rows])
                Wk, bk = Wk - lr * gW, bk - lr * gb
            gW, gb = L * (W - Wk), L * (b - bk)
            p = 1.0 if uniform else n_k
            sum_dW, sum_db = sum_dW + p * F ** q * gW, sum_db + p * F ** q * gb
            sum_h += p * (q * F ** (q - 1) * (np.sum(gW ** 2) + np.sum(gb ** 2)) + L * F ** q)
        W, b = W - sum_dW / sum_h, b - sum_db / sum_h
    return W, b


@pytest.mark.parametrize("q, lipschitz, weighting", [(2.0, None, "uniform"), (0.5, 3.0, "examples")])
def test_qffl_matches_a_per_client_reference_loop(tiny_data, q, lipschitz, weighting):
    """Four rounds, half the sampled clients straggling (dropped)."""
    model = fl.models.logistic(3)
    setup = fl.Setup.of(clients_per_round=3, local_steps=4, batch_size=3, client_lr=0.2,
                        stragglers=0.5, weighting=weighting)
    alg = qffl(model, q=q, lipschitz=lipschitz, setup=setup)
    state = alg.init(jax.random.key(0), tiny_data)
    params0 = state.params
    keys = [jax.random.key(100 + r) for r in range(4)]
    round_fn = jax.jit(alg.round)
    for key in keys:
        state, metrics = round_fn(state, tiny_data, key)
    L = 1 / 0.2 if lipschitz is None else lipschitz
    W, b = reference_rounds(tiny_data, alg, params0, keys, lr=0.2, q=q, L=L)
    np.testing.assert_allclose(state.params["Dense_0"]["kernel"], W, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.params["Dense_0"]["bias"], b, rtol=1e-5, atol=1e-6)
    W0, _ = reference_rounds(tiny_data, alg, params0, keys, lr=0.2, q=0.0, L=L)
    assert np.abs(W - W0).max() > 1e-3                  # q matters
    model_bytes = sum(4 * v.size for v in jax.tree.leaves(params0))
    assert float(metrics["bytes_up_per_client"]) == model_bytes + 4      # (Delta_k, h_k)


def test_q_zero_is_the_uniform_mean_of_the_local_models(tiny_data):
    """q = 0: Delta_k = L (w_t - w_bar_k), h_k = L, so w_{t+1} = mean_k w_bar_k, FedAvg with
    uniform weights (to float rounding: L multiplies and divides); q = 1 is not."""
    model = fl.models.logistic(3)
    flat = dict(clients_per_round=4, local_steps=3, batch_size=4, client_lr=0.1, weighting="uniform")
    setup = fl.Setup.of(**flat)
    q_round = jax.jit(lambda q, s, k: qffl(model, q=q, setup=setup).round(s, tiny_data, k)[0])
    avg = fedavg(model, setup=setup)
    rounds = {"q0": lambda s, k: q_round(0.0, s, k), "q1": lambda s, k: q_round(1.0, s, k),
              "avg": jax.jit(lambda s, k: avg.round(s, tiny_data, k)[0])}
    params = {}
    for name, fn in rounds.items():
        state = (avg if name == "avg" else qffl(model, setup=setup)).init(jax.random.key(0), tiny_data)
        for r in range(3):
            state = fn(state, jax.random.key(5 + r))
        params[name] = state.params["Dense_0"]["kernel"]
    np.testing.assert_allclose(params["q0"], params["avg"], rtol=1e-6, atol=1e-6)
    assert np.abs(params["q1"] - params["avg"]).max() > 1e-3


def test_a_larger_loss_weighs_more():
    """Two clients, one round from the same w_t, a tiny L (h_k ~ L F_k^q, so the step is
    sum F_k^q (w_bar_k - w_t) / sum F_k^q): a larger q lowers the loss of the client that was
    worse at w_t more, and that of the other client less, than q = 0 (FedAvg)."""
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(20, 4)).astype(np.float32) + 3 * k for k in range(2)]
    ys = [rng.integers(0, 3, 20) for _ in range(2)]
    data = fl.data.from_client_lists(xs, ys, num_classes=3)
    model = fl.models.logistic(3)
    setup = fl.Setup.of(clients_per_round=2, local_steps=5, batch_size=5, client_lr=0.05)
    fn = jax.jit(lambda q, s, k: qffl(model, q=q, lipschitz=1e-3, setup=setup).round(s, data, k)[0])
    state = qffl(model, setup=setup).init(jax.random.key(1), data)
    loss = lambda params, k: ce(*(np.asarray(params["Dense_0"][n], np.float64) for n in ("kernel", "bias")),
                                np.asarray(xs[k], np.float64), ys[k])
    F = [loss(state.params, k) for k in range(2)]
    worse = int(np.argmax(F))
    after = {q: [loss(fn(q, state, jax.random.key(3)).params, k) for k in range(2)] for q in (0.0, 5.0)}
    print("F(w_t)", F, "after one round", after)
    assert F[worse] > 1.2 * F[1 - worse]
    assert after[5.0][worse] < after[0.0][worse] - 1e-3
    assert after[5.0][1 - worse] > after[0.0][1 - worse]


def test_bad_input_is_refused():
    model = fl.models.logistic(3)
    with pytest.raises(ValueError, match="q"):
        qffl(model, q=-1.0)
    with pytest.raises(ValueError, match="lipschitz"):
        qffl(model, lipschitz=0.0)
    with pytest.raises(ValueError, match="lipschitz"):
        qffl(model, lipschitz=float("nan"))
