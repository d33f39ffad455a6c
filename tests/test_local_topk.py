"""Local top-k with per-client error feedback (algorithms/local_topk.py) against a numpy
per-client reference loop; the shared FetchSGD references live in tests/test_fetchsgd.py."""
import jax
import numpy as np
import pytest

from fedjax_lab import Setup
from fedjax_lab.algorithms.local_topk import local_topk
from fedjax_lab.core.setup import Cohort, LocalWork
from fedjax_lab.core.tree import flatten
from test_fetchsgd import (LOGISTIC, client_grads_reference, participate_jit, run_rounds,
                           topk_reference)


@pytest.mark.parametrize("error_feedback, server", [(True, "sgdm"), (False, "sgdm"),
                                                    (True, "fedadam")])
def test_local_topk_rounds_equal_reference_loop(tiny_data, error_feedback, server):
    """Server SGD with momentum (the baseline of the paper) or any server optimizer on the mean
    message (FedAdam: Reddi et al.'s Algorithm 2, written out below)."""
    model = LOGISTIC
    lr, rho, k, rounds = 0.5, 0.9, 4, 3
    b1, b2, tau = 0.9, 0.99, 1e-3
    key = jax.random.key(3)
    k_init, k_rounds = jax.random.split(key)
    server_opt = dict(server_lr=lr, server_momentum=rho) if server == "sgdm" else \
        dict(server_optimizer="fedadam", server_lr=lr, server_b1=b1, server_b2=b2, server_eps=tau)
    alg = local_topk(model, k=k, error_feedback=error_feedback,
                     setup=Setup.of(clients_per_round=3, batch_size=4, **server_opt))
    state, (_, *metrics) = run_rounds(alg, tiny_data, key, rounds)

    w, unravel = flatten(alg.init(k_init, tiny_data).params)
    w = np.asarray(w)
    errors = np.zeros((tiny_data.num_clients, w.shape[0]), np.float32)
    u = np.zeros_like(w)
    m_adam, v_adam = np.zeros_like(w), np.full_like(w, tau ** 2)
    cohort = Cohort(3, weighting="uniform")
    work = LocalWork(batch_size=4, local_steps=1)
    for r in range(1, rounds + 1):
        k_part, k_train = jax.random.split(jax.random.fold_in(k_rounds, r))
        part = participate_jit(k_part, tiny_data, cohort, work)
        g, _ = client_grads_reference(model, tiny_data, part, w, unravel, k_train, 1.0)
        sent = np.zeros_like(g)
        for i, cid in enumerate(np.asarray(part.ids)):
            a = g[i] + (errors[cid] if error_feedback else 0.0)
            top = topk_reference(a, k)
            sent[i, top] = a[top]
            if error_feedback:
                errors[cid] = a - sent[i]
        if server == "sgdm":
            u = rho * u + sent.mean(0)
            w = w - lr * u
        else:
            g_t = sent.mean(0)
            m_adam = b1 * m_adam + (1 - b1) * g_t
            v_adam = b2 * v_adam + (1 - b2) * g_t ** 2
            w = w - lr * m_adam / (np.sqrt(v_adam) + tau)
    np.testing.assert_allclose(np.asarray(flatten(state.params)[0]), w, atol=1e-5)
    if error_feedback:
        np.testing.assert_allclose(np.asarray(state.errors), errors, atol=1e-5)
    assert float(metrics[0]["bytes_up"]) == 3 * k * 8
    assert all(float(m["local_objective"]) == float(m["local_loss"]) for m in metrics)
