"""The round skeleton's exchange (core/skeleton.py) against a per-client numpy loop: clients that
start from their own rows (w_start), send part of their message (send), an aggregator with
auxiliary outputs (has_aux) whose aux lands in the metrics, the byte counts from up_bytes /
down_bytes; bad combinations refused."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import Cohort, LocalWork, Optimizer, Setup, aggregators, models
from fedjax_lab import data as D
from fedjax_lab.aggregators import Aggregator
from fedjax_lab.algorithms.fedavg import fedavg
from tests.reference import softmax_grads

LR, C = 0.1, 4


def weighted_mean_with_spread(u, w):
    """(sum_k w_k u_k / sum_k w_k, {"weight_total": sum_k w_k}) as a has_aux aggregator."""
    total = jnp.sum(w)
    mean = jax.tree.map(lambda x: jnp.tensordot(w, x, 1) / total, u)
    return mean, {"weight_total": total}


def test_exchange_from_rows_with_partial_send_and_aux_matches_per_client_loop():
    d = D.synthetic(1, 1, num_clients=7, seed=5, max_size=24, min_size=8)
    agg = Aggregator("mean_aux", weighted_mean_with_spread, has_aux=True)
    alg = fedavg(models.logistic(10), setup=Setup(
        cohort=Cohort(C, weighting="examples"), work=LocalWork(batch_size=4, local_steps=3),
        client_opt=Optimizer("sgd", lr=LR), aggregator=agg))
    bias_only = lambda msgs: {"Dense_0": {"bias": msgs["Dense_0"]["bias"],
                                          "kernel": jnp.zeros_like(msgs["Dense_0"]["kernel"])}}
    rnd = dataclasses.replace(alg.server_round, send=bias_only, up_bytes=lambda w, data: 40,
                              down_bytes=lambda w, data: 7)
    state = alg.init(jax.random.key(0), d)
    key = jax.random.key(3)
    k_part, k_train = jax.random.split(key)
    part = jax.jit(rnd.participate)(k_part, d)
    rng = np.random.default_rng(0)
    w_start = jax.tree.map(lambda x: jnp.asarray(x[None] + 0.1 * rng.normal(size=(C,) + x.shape),
                                                 jnp.float32), state.params)
    new, metrics, ex = jax.jit(lambda st, p, w0: rnd.step_with_exchange(
        st, d, p, k_train=k_train, key=key, w_start=w0))(state, part, w_start)

    # the reference: plain SGD from each client's own row, bias-only upload, n_k-weighted mean
    x, y = np.asarray(d.x, np.float64), np.asarray(d.y)
    idx, mask = np.asarray(part.batches.idx), np.asarray(part.batches.step_mask)
    W0, b0 = (np.asarray(w_start["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
    n = np.asarray(part.num_examples, np.float64)
    dW, db = [], []
    for c in range(C):
        W, b = W0[c].copy(), b0[c].copy()
        for s in np.flatnonzero(mask[c]):
            gW, gb = softmax_grads(W, b, x[idx[c, s]], y[idx[c, s]])
            W, b = W - LR * gW, b - LR * gb
        dW.append(W - W0[c])
        db.append(b - b0[c])
    dW, db = np.stack(dW), np.stack(db)
    np.testing.assert_allclose(ex.messages["Dense_0"]["kernel"], dW, atol=1e-5)
    np.testing.assert_allclose(ex.messages["Dense_0"]["bias"], db, atol=1e-5)
    assert np.abs(dW).max() > 1e-3                                  # the kernels did move ...
    np.testing.assert_array_equal(ex.sent["Dense_0"]["kernel"], 0.0)  # ... but were not sent
    np.testing.assert_allclose(ex.sent["Dense_0"]["bias"], db, atol=1e-5)
    want_b = np.asarray(state.params["Dense_0"]["bias"]) + n @ db / n.sum()   # server SGD, lr 1
    np.testing.assert_allclose(new.params["Dense_0"]["bias"], want_b, atol=1e-5)
    np.testing.assert_array_equal(new.params["Dense_0"]["kernel"], state.params["Dense_0"]["kernel"])
    np.testing.assert_allclose(ex.weights, n)
    assert float(metrics["weight_total"]) == n.sum()                # the aggregator's aux output
    assert float(metrics["bytes_up_per_client"]) == 40 and float(metrics["bytes_down"]) == 7 * C


def test_bad_combinations():
    d = D.synthetic(1, 1, num_clients=7, seed=5, max_size=24, min_size=8)
    clash = Aggregator("clash", lambda u, w: (jax.tree.map(lambda x: x[0], u), {"local_loss": 0.0}),
                       has_aux=True)
    alg = fedavg(models.logistic(10), setup=Setup(cohort=Cohort(C), aggregator=clash))
    state = jax.eval_shape(alg.init, jax.random.key(0), d)       # shapes only: nothing compiles
    with pytest.raises(ValueError, match=r"aux outputs \['local_loss'\] clash"):
        jax.eval_shape(alg.round, state, d, jax.random.key(1))
    chunked = fedavg(models.logistic(10), setup=Setup(cohort=Cohort(C), work=LocalWork(
        client_chunk=2))).server_round
    with pytest.raises(ValueError, match="client_chunk=2 sends whole messages; it needs send=None"):
        dataclasses.replace(chunked, send=lambda m: m)
    rows = jax.tree.map(lambda x: jnp.zeros((C,) + x.shape), state.params)

    def from_rows(key):
        part = chunked.participate(key, d)
        return chunked.exchange(state.params, d, part, k_train=key, key=key, w_start=rows)
    with pytest.raises(ValueError, match="client_chunk=2 starts every client from w_t"):
        jax.eval_shape(from_rows, jax.random.key(1))
    with pytest.raises(ValueError, match="aggregator 'dp_mean' draws its noise from the round key"):
        aggregators.dp_mean()(rows, jnp.ones(C))
