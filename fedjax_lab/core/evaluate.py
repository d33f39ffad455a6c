"""Evaluation of global and personalized models on every client's split, on device.

Both paths produce per-client sums (loss, correct, count); `summarize` turns them into the
weighted means over examples, unweighted means over clients and p10/p50/p90 of per-client accuracy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _per_example(model, params, x, y):
    logits = model.apply(params, x, train=False, rng=None)
    return model.loss(logits, y), (jnp.argmax(logits, -1) == y).astype(jnp.float32)


def global_sums(model, params, split, *, chunk: int = 4096):
    """Per-client (loss_sum, correct_sum, count) of one model on all examples of `split`."""
    total = split.num_examples
    chunk = max(1, min(chunk, total))
    num_chunks = -(-total // chunk)
    pad = num_chunks * chunk - total
    rows = jnp.minimum(jnp.arange(num_chunks * chunk), total - 1).reshape(num_chunks, chunk)

    def body(r):
        return _per_example(model, params, split.x[r], split.y[r])

    loss, correct = jax.lax.map(body, rows)
    valid = (jnp.arange(num_chunks * chunk) < total).astype(jnp.float32)
    loss, correct = loss.reshape(-1) * valid, correct.reshape(-1) * valid
    owner = jnp.searchsorted(split.offsets[1:], jnp.minimum(jnp.arange(total + pad), total - 1),
                             side="right")
    n = split.num_clients
    seg = lambda v: jax.ops.segment_sum(v, owner, num_segments=n)
    return seg(loss), seg(correct), split.client_sizes.astype(jnp.float32)


def personal_sums(model, client_params, state, split, *, clients_per_chunk: int = 64):
    """Per-client sums where client k is evaluated with its own `client_params(state, [k])`,
    `clients_per_chunk` clients at a time (a lax.map over chunks bounds the stacked params)."""
    n = split.num_clients
    K = max(1, min(clients_per_chunk, n))
    num_chunks = -(-n // K)
    ids = jnp.minimum(jnp.arange(num_chunks * K), n - 1).reshape(num_chunks, K)
    body = lambda chunk_ids: client_sums(model, client_params(state, chunk_ids), split, chunk_ids)[:2]
    loss, correct = jax.lax.map(body, ids)
    return loss.reshape(-1)[:n], correct.reshape(-1)[:n], split.client_sizes.astype(jnp.float32)


def summarize(prefix: str, loss_sum, correct_sum, count) -> dict:
    """Host-side summary of per-client sums (called once per evaluation, off the hot path)."""
    loss_sum, correct_sum, count = (np.asarray(v, np.float64) for v in (loss_sum, correct_sum, count))
    total = max(count.sum(), 1.0)
    has = count > 0
    acc = correct_sum[has] / count[has]
    out = {f"{prefix}_loss": float(loss_sum.sum() / total),
           f"{prefix}_accuracy": float(correct_sum.sum() / total)}
    if acc.size:
        p10, p50, p90 = np.percentile(acc, [10, 50, 90])
        out.update({f"{prefix}_accuracy_client_mean": float(acc.mean()),
                    f"{prefix}_accuracy_p10": float(p10), f"{prefix}_accuracy_p50": float(p50),
                    f"{prefix}_accuracy_p90": float(p90)})
    return out


def evaluation_sums(alg, state, data, adapt_data=None) -> dict:
    """All per-client sums the driver reports, as device arrays (jittable). `adapt_data`: what an
    algorithm with `adapt` (FedMeta, Per-FedAvg) adapts on before its test split is scored
    (`test_adapted_*`): each client's support, or train, split, never its test split."""
    out = {}
    if getattr(alg, "evaluate_sums", None) is not None:   # clients of different architectures (core/hetero)
        out.update(alg.evaluate_sums(state, data))
    if getattr(alg, "adapt", None) is not None and adapt_data is not None and data.test is not None \
            and data.test.num_examples:
        out["test_adapted"] = personal_sums(
            alg.model, lambda st, ids: alg.adapt(st, adapt_data, ids), state, data.test)
    if alg.global_params is not None:
        params = alg.global_params(state)
        out["train"] = global_sums(alg.model, params, data)
        if data.test is not None and data.test.num_examples:
            out["test"] = global_sums(alg.model, params, data.test)
    if alg.personalized:
        out["train_personal"] = personal_sums(alg.model, alg.client_params, state, data)
        if data.test is not None and data.test.num_examples:
            out["test_personal"] = personal_sums(alg.model, alg.client_params, state, data.test)
    return out


def evaluation_metrics(sums: dict) -> dict:
    """Flatten evaluation sums into metric names: train_*, test_*, and *_personal_* for personalized
    models; when an algorithm has no global model its personalized numbers also fill test_* / train_*."""
    out = {}
    for name, (l, c, n) in sums.items():
        out.update(summarize(name, l, c, n))
    for split in ("train", "test"):
        if f"{split}_personal" in sums and split not in sums:
            out.update(summarize(split, *sums[f"{split}_personal"]))
    return out


def client_params_of_global(state_params_fn):
    """client_params for algorithms whose clients all deploy the global model."""
    def client_params(state, ids):
        params = state_params_fn(state)
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (ids.shape[0],) + x.shape), params)
    return client_params


def adapted_client_params(model, optimizer, train, *, steps: int, batch_size: int, lam: float = 0.0,
                          shuffle: str = "auto"):
    """client_params((params, key), ids) for clients that adapt a shared model themselves: client k
    starts from v = params and takes `steps` steps of `optimizer` on its own train split with the
    objective F_k(v) + lam/2 ||v - params||^2 (lam = 0: plain fine-tuning; lam > 0: Ditto's
    personal objective). Batches depend only on (key, k), so chunking does not change the result."""
    from fedjax_lab.core.batching import draw_batches
    from fedjax_lab.core.local import local_train
    from fedjax_lab.core.tree import tree_sq_norm, tree_sub

    def client_params(state, ids):
        params, key = state
        extra = None if lam == 0 else (lambda v: 0.5 * lam * tree_sq_norm(tree_sub(v, params)))
        train_fn = local_train(model, optimizer, extra_loss=extra)
        b = draw_batches(key, train, ids, batch_size=batch_size, local_steps=steps, shuffle=shuffle)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
        return jax.vmap(train_fn, in_axes=(None, None, None, 0, 0, 0))(
            params, train.x, train.y, b.idx, b.step_mask, keys).params

    return client_params


def adapted_sums(model, optimizer, params, data, key, *, steps: int, batch_size: int,
                 lam: float = 0.0, clients_per_chunk: int = 64):
    """Per-client test sums after every client of `data` adapts `params` on its train split (see
    adapted_client_params). On clients that never took part in training this is the "new client"
    evaluation of a personalized method (`summarize("new_test", *sums)`); with lam = 0 on the
    training clients it is the FedAvg + fine-tuning baseline."""
    if data.test is None:
        raise ValueError("data: adapted evaluation needs a per-client test split (data.test is None)")
    fn = adapted_client_params(model, optimizer, data, steps=steps, batch_size=batch_size, lam=lam)
    return personal_sums(model, fn, (params, key), data.test, clients_per_chunk=clients_per_chunk)


def client_sums(model, params, split, ids):
    """(loss_sum, correct_sum, count) [K] of clients `ids` [K] on `split`, client ids[i] evaluated
    with row i of the stacked `params` (for rows that live outside the state, e.g. a host store)."""
    width = max(split.max_client_size, 1)
    last_row = max(split.num_examples - 1, 0)

    def one(p, lo, size):
        r = jnp.minimum(lo + jnp.arange(width), last_row)
        m = (jnp.arange(width) < size).astype(jnp.float32)
        loss, correct = _per_example(model, p, split.x[r], split.y[r])
        return jnp.sum(loss * m), jnp.sum(correct * m)

    lo = split.offsets[ids]
    size = split.offsets[ids + 1] - lo
    loss, correct = jax.vmap(one)(params, lo, size)
    return loss, correct, size.astype(jnp.float32)
