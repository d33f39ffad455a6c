"""The evaluation protocol of meta-learning personalization (FedMeta, Per-FedAvg, later pFedHN).

    support, query = split_support_query(data, support_fraction=0.2, seed=0)
    train_ids, val_ids, test_ids = client_roles(data.num_clients, (0.8, 0.1, 0.1), seed=0)
    train, new = select_clients(data, train_ids), select_clients(data, test_ids)
    ...                                               # train an algorithm on `train`
    s_train, _ = split_support_query(train)           # the split FedMeta trained with
    m = adapted_evaluation(model, alg.adapt, state, s_train, train.test, prefix="train_adapted")
    s_new, _ = split_support_query(new)
    m |= adapted_evaluation(model, alg.adapt, state, s_new, new.test, prefix="new_adapted")
    m |= adapted_evaluation(model, finetune(model, Optimizer("sgd", lr=0.05), steps=20,
                            batch_size=10), params, s_new, new.test, prefix="new_fedavg_meta")

Support / query. Client k's train split (n_k examples) is cut into a support set of
    n_S(k) = clip(floor(f * n_k + 1/2), 1, n_k - 1)       (f = support_fraction, float32 arithmetic)
examples and a query set of the other n_k - n_S(k), both at least one example (a client with fewer
than two examples is an error). Which examples are support is a uniform permutation drawn from
fold_in(key(seed), k): fixed by (seed, k), the same in every round and independent of which other
clients exist. `support_query_rows` is that rule on device (a round splits its clients on the fly
with it); `split_support_query` materializes it as two FederatedArrays. Default f = 0.2 as in
Flower's FedMeta baseline. The held-out split `data.test` is never part of either.

Client roles. `client_roles` splits the client ids into training / validation / test clients
(default 80/10/10, as FedMeta does), a seeded permutation; `select_clients` keeps those clients of a
FederatedArrays (and of its test split). Test clients are the "new clients" never seen in training.

Personalized evaluation. `adapted_evaluation(model, adapt, state, support, target)` adapts with
`adapt(state, support, ids) -> stacked params [K, ...]` (it is given the support split and nothing
else, so adaptation can never touch the query or test data: PFLlib's Per-FedAvg adapts on a test
batch, we do not) and evaluates client k's adapted model on its rows of `target` (the query split
or the held-out test split). It reports, under `prefix`, the example-weighted accuracy
(`{prefix}_accuracy`) and loss, the unweighted mean over clients (`_accuracy_client_mean`) and
p10/p50/p90 of per-client accuracy (core/evaluate.summarize). Adapters: `gd_adapt` (full-batch
gradient descent on each client's support set: the inner loop of MAML-style methods),
`finetune` (mini-batch steps of any optimizer from core/evaluate.adapted_client_params: the
"FedAvg(Meta)" baseline = FedAvg then fine-tuning on the support set) and `no_adapt` (the global
model itself, for the FedAvg row of the same table).

`MetaAlgorithm` is an Algorithm with an `adapt(state, support, ids)` field: the Algorithm record's
`client_params(state, ids)` sees no data, so adaptation on a support set cannot live there.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.core import validate
from fedjax_lab.core.batching import epoch_permutations
from fedjax_lab.core.evaluate import adapted_client_params, personal_sums, summarize
from fedjax_lab.core.types import Algorithm
from fedjax_lab.data.federated import FederatedArrays, federated_arrays

ROLES = ("train", "val", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class MetaAlgorithm(Algorithm):
    """An Algorithm whose clients adapt on their support set: adapt(state, support, ids) -> the
    stacked adapted params of clients `ids` [K] (rows of `support`, a FederatedArrays)."""
    adapt: Optional[Callable] = None
    adapt_split: Callable = lambda data: data   # the clients' data adapt() sees (their support)


# ---------------------------------------------------------------------------------------------
# Support / query split.

def check_support_fraction(support_fraction, sizes, *, name: str = "data"):
    """ValueError unless 0 < support_fraction < 1 and every client has >= 2 examples."""
    f = support_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < float(f) < 1.0:
        raise ValueError(f"support_fraction must lie in (0, 1), got {f!r}")
    sizes = np.asarray(sizes)
    small = np.flatnonzero(sizes < 2)
    if small.size:
        k = int(small[0])
        raise ValueError(f"support_fraction={f}: {name} client {k} has {int(sizes[k])} example(s); "
                         f"every client needs >= 2 (>= 1 support and >= 1 query example); "
                         f"clients too small to split: {small[:10].tolist()}")


def support_count(n, support_fraction):
    """n_S = clip(floor(f n + 1/2), 1, n - 1) in float32 (the same on host and device)."""
    f = jnp.float32(support_fraction)
    n_s = jnp.floor(f * jnp.asarray(n).astype(jnp.float32) + jnp.float32(0.5)).astype(jnp.int32)
    return jnp.clip(n_s, 1, jnp.maximum(jnp.asarray(n) - 1, 1))


def support_query_rows(data: FederatedArrays, ids, support_fraction: float, seed: int = 0):
    """([K, W] support rows, [K, W] query rows) of clients `ids` in data's flat arrays, W =
    data.max_client_size, padded with -1 (jittable; the rule of the module docstring)."""
    width = max(data.max_client_size, 1)
    lo = data.offsets[ids]
    n = data.offsets[ids + 1] - lo
    n_s = support_count(n, support_fraction)
    base = jax.random.key(seed)
    perm = jax.vmap(lambda i, n_: epoch_permutations(jax.random.fold_in(base, i), n_, passes=1,
                                                     width=width)[0])(ids, n)
    pos = jnp.arange(width)[None, :]
    support = jnp.where(pos < n_s[:, None], lo[:, None] + perm, -1)
    shifted = jnp.take_along_axis(perm, jnp.minimum(pos + n_s[:, None], width - 1), axis=1)
    query = jnp.where(pos < (n - n_s)[:, None], lo[:, None] + shifted, -1)
    return support.astype(jnp.int32), query.astype(jnp.int32)


def split_support_query(data: FederatedArrays, support_fraction: float = 0.2, seed: int = 0):
    """(support, query): two FederatedArrays over the same clients (module docstring); test=None
    on both (the held-out split stays in data.test)."""
    check_support_fraction(support_fraction, np.asarray(data.client_sizes))
    ids = jnp.arange(data.num_clients)
    s_rows, q_rows = jax.device_get(support_query_rows(data, ids, support_fraction, seed))
    x, y = np.asarray(data.x), np.asarray(data.y)

    def gather(rows):
        sizes = (rows >= 0).sum(axis=1)
        flat = rows[rows >= 0]             # row-major: client by client, in permutation order
        return federated_arrays(x[flat], y[flat], np.concatenate([[0], np.cumsum(sizes)]),
                                num_classes=data.num_classes)
    return gather(s_rows), gather(q_rows)


# ---------------------------------------------------------------------------------------------
# Client roles.

def client_roles(num_clients: int, fractions=(0.8, 0.1, 0.1), seed: int = 0):
    """(train_ids, val_ids, test_ids): a seeded permutation of range(num_clients) cut by
    `fractions`; val and test get round(f N) clients (at least one where f > 0), train the rest."""
    validate.positive("num_clients", num_clients, integer=True)
    fr = tuple(fractions) if isinstance(fractions, (tuple, list)) else None
    if (fr is None or len(fr) != 3
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 for v in fr)
            or abs(sum(fr) - 1.0) > 1e-6 or fr[0] <= 0):
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test) summing "
                         f"to 1 with train > 0, got {fractions!r}")
    counts = [0 if f == 0 else max(1, int(np.rint(f * num_clients))) for f in fr[1:]]
    n_train = num_clients - sum(counts)
    if n_train < 1:
        raise ValueError(f"num_clients={num_clients} is too few for fractions={fractions!r}: "
                         f"val and test take {counts}, leaving {n_train} training clients")
    perm = np.random.default_rng(seed).permutation(num_clients)
    cuts = np.cumsum([n_train, counts[0]])
    return tuple(np.sort(p).astype(np.int32) for p in np.split(perm, cuts))


def select_clients(data: FederatedArrays, ids) -> FederatedArrays:
    """The clients `ids` of `data` (train and test splits), renumbered 0..len(ids)-1 in that order."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be a non-empty 1-D array of client ids, got shape {ids.shape} "
                         f"dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= data.num_clients:
        raise ValueError(f"ids must lie in [0, num_clients={data.num_clients}), got range "
                         f"[{ids.min()}, {ids.max()}]")

    def pick(split, name, allow_empty):
        off = np.asarray(split.offsets)
        rows = np.concatenate([np.arange(off[k], off[k + 1]) for k in ids]).astype(np.int64)
        sizes = off[ids + 1] - off[ids]
        return np.asarray(split.x)[rows], np.asarray(split.y)[rows], \
            np.concatenate([[0], np.cumsum(sizes)]), allow_empty, name

    test = None
    if data.test is not None:
        x, y, off, _, name = pick(data.test, "test split", True)
        test = federated_arrays(x, y, off, num_classes=data.num_classes, allow_empty=True, name=name)
    x, y, off, _, _ = pick(data, "data", False)
    return federated_arrays(x, y, off, test=test, num_classes=data.num_classes,
                            allow_empty=data.min_client_size == 0)


# ---------------------------------------------------------------------------------------------
# Adaptation and its evaluation.

def client_rows(split: FederatedArrays, ids):
    """[K, W] rows of clients `ids` in `split` (all their rows), padded with -1, W = max size."""
    width = max(split.max_client_size, 1)
    lo = split.offsets[ids]
    n = split.offsets[ids + 1] - lo
    pos = jnp.arange(width)[None, :]
    return jnp.where(pos < n[:, None], lo[:, None] + pos, -1).astype(jnp.int32)


def masked_loss(model, params, x, y, rows, rng=None, *, train: bool = True):
    """Mean loss of `model` over the rows >= 0 of `rows` [W] (0 when there are none)."""
    mask = (rows >= 0).astype(jnp.float32)
    r = jnp.maximum(rows, 0)
    losses = model.loss(model.apply(params, x[r], train=train, rng=rng), y[r])
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def gd_steps(model, params, alpha, x, y, rows, key, *, steps: int, first_order: bool = False):
    """`steps` full-batch gradient steps theta <- theta - alpha * grad L_S(theta) on `rows` [W];
    alpha a scalar or a pytree like params (Meta-SGD); first_order: stop_gradient on each
    gradient (FOMAML: d theta' / d theta = I). Differentiable in params and alpha."""
    grad = jax.grad(lambda p, rng: masked_loss(model, p, x, y, rows, rng))
    alpha_tree = alpha if jax.tree.structure(alpha) == jax.tree.structure(params) else \
        jax.tree.map(lambda _: alpha, params)
    for s in range(steps):           # static and small; unrolled so second order stays exact
        g = grad(params, jax.random.fold_in(key, s))
        if first_order:
            g = jax.lax.stop_gradient(g)
        params = jax.tree.map(lambda p, a, g_: p - a * g_, params, alpha_tree, g)
    return params


def gd_adapt(model, inner_lr, *, steps: int = 1, params_of=lambda state: state,
             alpha_of=None, seed: int = 0):
    """adapt(state, support, ids): `steps` full-batch GD steps at `inner_lr` (or the pytree
    alpha_of(state)) from params_of(state) on each client's whole support set."""
    validate.positive("steps", steps, integer=True)

    def adapt(state, support, ids):
        params = params_of(state)
        alpha = inner_lr if alpha_of is None else alpha_of(state)
        base = jax.random.key(seed)
        one = lambda rows, i: gd_steps(model, params, alpha, support.x, support.y, rows,
                                       jax.random.fold_in(base, i), steps=steps)
        return jax.vmap(one)(client_rows(support, ids), ids)
    return adapt


def finetune(model, optimizer, *, steps: int, batch_size: int, seed: int = 0,
             params_of=lambda state: state):
    """adapt(state, support, ids): `steps` mini-batch steps of `optimizer` (an Optimizer or optax
    transformation) on each client's support set (core/evaluate.adapted_client_params); with the
    FedAvg model this is the "FedAvg(Meta)" baseline."""
    from fedjax_lab.core.setup import Optimizer
    tx = Optimizer.of(optimizer).build("optimizer")
    validate.positive("steps", steps, integer=True)
    validate.positive("batch_size", batch_size, integer=True)

    def adapt(state, support, ids):
        fn = adapted_client_params(model, tx, support, steps=steps, batch_size=batch_size)
        return fn((params_of(state), jax.random.key(seed)), ids)
    return adapt


def no_adapt(params_of=lambda state: state):
    """adapt(state, support, ids): the global model for every client (no adaptation)."""
    def adapt(state, support, ids):
        p = params_of(state)
        return jax.tree.map(lambda v: jnp.broadcast_to(v, (ids.shape[0],) + v.shape), p)
    return adapt


def adapted_sums(model, adapt, state, support: FederatedArrays, target: FederatedArrays, *,
                 clients_per_chunk: int = 64):
    """Per-client (loss_sum, correct_sum, count) on `target` after `adapt` on `support`
    (jittable; chunks of clients_per_chunk clients bound the stacked adapted params)."""
    client_params = lambda st, ids: adapt(st, support, ids)
    return personal_sums(model, client_params, state, target, clients_per_chunk=clients_per_chunk)


_adapted_sums_jit = jax.jit(adapted_sums, static_argnames=("model", "adapt", "clients_per_chunk"))


def adapted_evaluation(model, adapt, state, support: FederatedArrays, target: FederatedArrays, *,
                       prefix: str = "adapted", clients_per_chunk: int = 64) -> dict:
    """Adapt every client on `support`, evaluate on `target` (module docstring): {prefix}_loss,
    {prefix}_accuracy (weighted by examples), _accuracy_client_mean, _accuracy_p10/p50/p90.
    Compiled once per (model, adapt) identity and shapes: pass the same `adapt` to reuse it."""
    if not isinstance(support, FederatedArrays) or not isinstance(target, FederatedArrays):
        raise ValueError("support and target must be FederatedArrays (see split_support_query)")
    if support.num_clients != target.num_clients:
        raise ValueError(f"support and target must hold the same clients, got {support.num_clients} "
                         f"and {target.num_clients}")
    if support.min_client_size < 1:
        raise ValueError("support: every client needs >= 1 support example to adapt on")
    validate.positive("clients_per_chunk", clients_per_chunk, integer=True)
    sums = _adapted_sums_jit(model, adapt, state, support, target,
                             clients_per_chunk=clients_per_chunk)
    return summarize(prefix, *jax.device_get(sums))
