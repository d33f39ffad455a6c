"""FedAMP and HeurFedAMP (Huang, Chu, Zhou, Wang, Liu, Pei, Zhang, "Personalized Cross-Silo
Federated Learning on Non-IID Data", AAAI 2021).

Every client i owns a model w_i (a row of the state, [N, ...]). Objective:
    min_W  sum_i F_i(w_i) + lam * sum_{i<j} A(||w_i - w_j||^2),   A(x) = 1 - exp(-x / sigma)
with A increasing and concave, so that similar clients attract each other strongly and dissimilar
ones hardly at all. Round k (sampled clients S_k; the paper's cross-silo setting samples everyone):

  server, for i in S_k:  u_i = sum_j xi_ij w_j                      (personalized cloud model)
      FedAMP:      xi_ij = alpha_k * A'(||w_i - w_j||^2)  (j != i),  A'(x) = exp(-x/sigma) / sigma
                   xi_ii = 1 - sum_{j != i} xi_ij
      HeurFedAMP:  xi_ij = (1 - xi_ii) * exp(sigma cos(w_i, w_j)) / sum_{h != i} exp(sigma cos(w_i, w_h))
                   with the self-weight xi_ii = `self_weight` a hyperparameter
  client i:  w_i <- argmin_w F_i(w) + lam / (2 alpha_k) * ||w - u_i||^2   (local_steps SGD steps)

U = W - alpha_k grad A(W) is a gradient step on the attention term, the client step a proximal
step on F (an incremental-proximal method). `attention="none"` is the ablation: xi_ij = 0 for
j != i, so u_i = w_i and the proximal term only keeps w_i near its value at the start of the round
(local training with the same proximal term, no message passing, nothing sent).

The shared values (`setup`): the Cohort (who is sampled), the LocalWork (the client's SGD steps or
epochs; a straggler keeps its partial work: there is no aggregate to drop it from, so
`drop_stragglers=True` is an error) and the client optimizer. Cohort.weighting is not used: every
sampled client updates its own row, and the metrics are plain means over the sampled clients.

The pairwise distances are one matrix computation on the flattened models W [M, P] (never a double
loop): ||w_i - w_j||^2 = g_ii + g_jj - 2 g_ij from the Gram matrix of the *centred* models (the
distances do not change under a shift, and centring avoids cancellation in float32). Memory:
W is M x P floats, the distance block C x M; both are computed in chunks of `attention_chunk`
sampled clients with `lax.map`, so the peak is attention_chunk x M + M x P floats. At M = 1,000
clients: the [1000, 1000] distance matrix is 4 MB, and W is 2.4 MB for the 610-parameter logistic
model but 4 GB for a 1M-parameter CNN (then W, not the Gram matrix, is the limit).

Paper vs. its own gradient: d/dw_i A(||w_i - w_j||^2) = 2 A'(.) (w_i - w_j), so the exact step
u_i = w_i - alpha_k grad_i sum_{i<j} A has xi_ij = 2 alpha_k A'(.); the paper writes
xi_ij = alpha_k A'(.), i.e. it absorbs the factor 2 into alpha_k. We follow the paper's xi (our
alpha_k is the paper's), and keep the same alpha_k in the proximal weight lam / (2 alpha_k).

Paper vs. PFLlib's FedAMP (the code most people run; the authors' code is not public):
  * PFLlib's proximal term uses `p.data`, so it contributes no gradient, and takes the norm without
    squaring; we implement the paper's lam/(2 alpha_k) ||w - u_i||^2 (never the no-gradient bug).
  * PFLlib computes the attention only among the models uploaded in the previous round;
    the paper uses all clients' latest models. `neighbors="all"` (default, the paper) uses every
    stored row; `neighbors="sampled"` only this round's sampled clients (the code's variant).
  * Both start the local solver from the client's own w_i (`start="own"`); `start="cloud"` starts
    from u_i instead. The paper only states the argmin, which both approximate.
With neighbors="all" the self-weight is 1 - alpha_k * sum_j A'(.) >= 1 - alpha_k (M - 1) / sigma,
which `check` requires to be >= 0 (at round 1 all models are equal and the bound is attained).

Mesh padding (core/sharding.py) and repeated draws: the candidates are distinct real clients.
With neighbors="all" they are the N stored rows, so the dummy clients (id N) are none of them. With
neighbors="sampled" the dummy's gathered row is a clamped copy of row N - 1, and a client drawn
twice by sampling="size" (with replacement) is one device with one model: only the first draw of
each real client is a column, so neither a dummy nor a client's own copy takes attention. The
dummy's u_i and trained row are dropped by the scatter; a repeated client's copies share u_i,
batches and keys, so they write back the same row (and count twice in the metrics, as in
core/rounds.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fedjax_lab.extend import (ClientRows, Cohort, LocalWork, Model, Optimizer, RowAlgorithm,
                               Setup, begin_round, client_keys, comm, defaults, first_draw,
                               flatten, local_train, resolve, tree_broadcast, tree_put,
                               tree_sq_norm, tree_sub, tree_take, validate, values,
                               weighted_mean_scalar)


def pairwise_sq_dists(a, b):
    """[A, B] squared Euclidean distances between rows of a [A, P] and b [B, P] via one Gram product."""
    g = a @ b.T
    return jnp.maximum(jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * g, 0.0)


def cosine_similarity(a, b):
    """[A, B] cosine similarities of the rows of a and b."""
    na = a / jnp.maximum(jnp.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    nb = b / jnp.maximum(jnp.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return na @ nb.T


def fedamp_attention(sq_dists, is_self, valid, *, alpha_k: float, sigma: float):
    """FedAMP's xi [C, M]: alpha_k A'(d_ij) off the diagonal, 1 - their sum on it (is_self);
    0 in the columns that are not valid [M]."""
    off = jnp.where(is_self | ~valid, 0.0, alpha_k * jnp.exp(-sq_dists / sigma) / sigma)
    return jnp.where(is_self, 1.0 - jnp.sum(off, axis=1, keepdims=True), off)


def heuristic_attention(cos, is_self, valid, *, self_weight: float, sigma: float):
    """HeurFedAMP's xi [C, M]: softmax of sigma * cos over the valid j != i, scaled by
    1 - self_weight; a client with no valid neighbour (all its draws are copies) keeps xi_ii = 1."""
    neighbour = ~is_self & valid
    alone = ~jnp.any(neighbour, axis=1, keepdims=True)
    logits = jnp.where(neighbour | alone, sigma * cos, -jnp.inf)      # no all -inf row (NaN)
    off = jnp.where(neighbour, (1.0 - self_weight) * jax.nn.softmax(logits, axis=1), 0.0)
    return jnp.where(is_self, jnp.where(alone, 1.0, self_weight), off)


def attention_weights(flat_sampled, flat_all, self_col, valid=None, *, attention: str,
                      alpha_k: float, sigma: float, self_weight: float):
    """xi [C, M] of the sampled clients (flat [C, P]) over the candidate models (flat [M, P]);
    self_col [C] is each sampled client's own column in the candidates; columns where `valid` [M]
    is False (mesh padding) get no weight."""
    m = flat_all.shape[0]
    is_self = jnp.arange(m)[None, :] == self_col[:, None]
    valid = jnp.ones((1, m), bool) if valid is None else valid[None, :]
    if attention == "exp":
        centre = jnp.mean(flat_all, axis=0)
        d = pairwise_sq_dists(flat_sampled - centre, flat_all - centre)
        return fedamp_attention(d, is_self, valid, alpha_k=alpha_k, sigma=sigma)
    return heuristic_attention(cosine_similarity(flat_sampled, flat_all), is_self, valid,
                               self_weight=self_weight, sigma=sigma)


# The factories' defaults lam = alpha_k = 0.1 (proximal weight lam / alpha_k = 1) and sigma = 10
# let the personal models train: the earlier lam = 1, alpha_k = 0.01 gave lr lam / alpha_k = 1,
# which pulled w_i back onto u_i at every step (60 rounds left 2-label digits clients at 0.24 /
# 0.11 accuracy; now 0.97 / 0.96). alpha_k (M - 1) / sigma <= 1 (check) holds up to M = 101.
FEDAMP = Setup(cohort=Cohort(clients_per_round=10, sampling="uniform"),
               work=LocalWork(batch_size=10, local_steps=20),
               client_opt=Optimizer("sgd", lr=0.01))
USES = {"cohort", "work", "client_opt"}


@defaults(FEDAMP, uses=USES)
def fedamp(model: Model, *, lam: float = 0.1, alpha_k: float = 0.1, sigma: float = 10.0,
           attention: str = "exp", self_weight: float = 0.5, neighbors: str = "all",
           start: str = "own", attention_chunk: int = 256,
           setup: Setup = Setup()) -> RowAlgorithm:
    """FedAMP (attention="exp"), HeurFedAMP (attention="cosine") or the no-message-passing
    ablation (attention="none"); see the module docstring. lam, alpha_k, sigma and self_weight
    may be traced.

    lam, alpha_k: the proximal weight is lam / alpha_k; sigma: A's scale (exp) or the softmax
    temperature (cosine); self_weight: HeurFedAMP's xi_ii. `setup`: who takes part (Cohort),
    the local work (LocalWork) and the client optimizer.
    """
    return _fedamp(model, fedamp, setup, lam=lam, alpha_k=alpha_k, sigma=sigma,
                   attention=attention, self_weight=self_weight, neighbors=neighbors,
                   start=start, attention_chunk=attention_chunk)


@defaults(FEDAMP, uses=USES)
def heurfedamp(model: Model, *, lam: float = 0.1, alpha_k: float = 0.1, sigma: float = 10.0,
               self_weight: float = 0.5, neighbors: str = "all", start: str = "own",
               attention_chunk: int = 256, setup: Setup = Setup()) -> RowAlgorithm:
    """HeurFedAMP: FedAMP with cosine-similarity attention and a fixed self-weight."""
    return _fedamp(model, heurfedamp, setup, lam=lam, alpha_k=alpha_k, sigma=sigma,
                   attention="cosine", self_weight=self_weight, neighbors=neighbors, start=start,
                   attention_chunk=attention_chunk)


def _check_step_size(client_opt: Optimizer, lam, alpha_k):
    """Plain SGD on lam/(2 alpha_k) ||w - u_i||^2 multiplies w - u_i by 1 - lr lam / alpha_k
    per step: it diverges for lr lam / alpha_k >= 2 (skipped for traced values)."""
    if client_opt.tx is not None or client_opt.name != "sgd":
        return
    lr, momentum = client_opt.lr, client_opt.momentum
    if any(values.is_traced(v) for v in (lr, momentum, lam, alpha_k)) or momentum != 0:
        return
    if lr * lam / alpha_k >= 2.0:
        raise ValueError(
            f"client_lr * lam / alpha_k = {lr * lam / alpha_k:.3g} >= 2: local SGD on the "
            f"proximal term lam/(2 alpha_k) ||w - u_i||^2 diverges; expected client_lr < "
            f"2 alpha_k / lam = {2 * alpha_k / lam:.3g} (or a smaller lam / larger alpha_k)")


def _fedamp(model: Model, factory, setup: Setup, *, lam, alpha_k, sigma, attention, self_weight,
            neighbors, start, attention_chunk) -> RowAlgorithm:
    validate.positive("lam", lam)
    validate.positive("alpha_k", alpha_k)
    validate.positive("sigma", sigma)
    validate.one_of("attention", attention, {"exp", "cosine", "none"})
    validate.fraction("self_weight", self_weight)
    validate.one_of("neighbors", neighbors, {"all", "sampled"})
    validate.one_of("start", start, {"own", "cloud"})
    validate.positive("attention_chunk", attention_chunk, integer=True)
    s = resolve(setup, factory)
    if s.work.drop_stragglers:
        raise ValueError("drop_stragglers=True: FedAMP has no aggregate to drop stragglers from "
                         "(every sampled client's row keeps its partial work); expected "
                         "drop_stragglers None or False")
    _check_step_size(s.client_opt, lam, alpha_k)
    cohort = s.cohort
    client_tx = s.client_opt.build("client_optimizer")
    name = factory.__name__

    def check(data):
        s.check(data)
        m = data.num_clients if neighbors == "all" else cohort.clients_per_round
        concrete = not any(values.is_traced(v) for v in (alpha_k, sigma))
        if attention == "exp" and concrete and alpha_k * (m - 1) / sigma > 1.0:
            raise ValueError(
                f"alpha_k={alpha_k} is too large for {m} clients in the attention with sigma={sigma}: "
                f"the self-weight 1 - alpha_k (M - 1) / sigma would be negative at round 1; expected "
                f"alpha_k <= sigma / (M - 1) = {sigma / max(m - 1, 1):.4g}")
        if attention == "cosine" and m < 2:
            raise ValueError(f"attention='cosine' needs at least 2 clients in the attention, got {m}")

    def init(key, data):
        check(data)
        params = model.init(key, data.x[:1])
        return ClientRows(server=jnp.zeros((), jnp.int32),
                          rows=jax.tree.map(jnp.array, tree_broadcast(params, data.num_clients)))

    def cloud_models(rows, ids, valid):
        """u_i for the sampled ids [C'] (valid [C']: not mesh padding), stacked like the rows,
        and xi_ii [C']."""
        if attention == "none":
            return tree_take(rows, ids), jnp.ones(ids.shape, jnp.float32)
        _, unravel = flatten(jax.tree.map(lambda x: x[0], rows))
        ravel = jax.vmap(lambda r: flatten(r)[0])
        if neighbors == "all":      # the dummy id N is no candidate; its own u is dropped
            flat_all, self_col, valid_col = ravel(rows), ids, None
        else:                       # columns: the first draw of each real client
            slot = jnp.arange(ids.shape[0])
            self_col = first_draw(ids) if cohort.sampling == "size" else slot
            flat_all, valid_col = ravel(tree_take(rows, ids)), valid & (self_col == slot)
        attend = functools.partial(attention_weights, attention=attention, alpha_k=alpha_k,
                                   sigma=sigma, self_weight=self_weight)
        own = flat_all[self_col]
        chunk = min(attention_chunk, ids.shape[0])
        pad = -ids.shape[0] % chunk
        cols = jnp.concatenate([self_col, jnp.broadcast_to(self_col[:1], (pad,))]).reshape(-1, chunk)
        def block(c):
            xi = attend(flat_all[c], flat_all, c, valid_col)
            return xi @ flat_all, jnp.sum(jnp.where(jnp.arange(flat_all.shape[0]) == c[:, None],
                                                    xi, 0.0), axis=1)
        u, xi_self = jax.lax.map(block, cols)
        u = u.reshape(-1, own.shape[1])[:ids.shape[0]]
        return jax.vmap(unravel)(u), xi_self.reshape(-1)[:ids.shape[0]]

    def round(state, data, key):
        part, data, (k_train,) = begin_round(key, data, s)
        u, xi_self = cloud_models(state.rows, part.ids, part.valid)
        own = tree_take(state.rows, part.ids)
        coef = lam / (2.0 * alpha_k)
        prox = lambda w, u_i: coef * tree_sq_norm(tree_sub(w, u_i))   # u_i an argument: see local_train
        train = local_train(model, client_tx, extra_loss=prox)
        res = jax.vmap(train, in_axes=(0, None, None, 0, 0, 0, None, 0))(
            own if start == "own" else u, data.x, data.y, part.batches.idx,
            part.batches.step_mask, client_keys(k_train, part.ids), None, u)
        real = part.valid.astype(jnp.float32)          # mesh padding clients count for nothing
        row_bytes = 0 if attention == "none" else comm.dense_bytes(
            jax.tree.map(lambda x: x[0], state.rows))
        metrics = dict(local_loss=weighted_mean_scalar(res.loss, real),
                       local_objective=weighted_mean_scalar(res.objective, real),
                       self_attention=weighted_mean_scalar(xi_self, real),
                       **comm.round_metrics(up_per_client=row_bytes, down_per_client=row_bytes,
                                            num_up=jnp.sum(real), num_down=jnp.sum(real)))
        return ClientRows(server=state.server + 1, rows=tree_put(state.rows, part.ids, res.params)), \
            metrics

    return RowAlgorithm(name=name, model=model, init=init, round=round,
                        client_params=lambda state, ids: tree_take(state.rows, ids),
                        personalized=True, check=check, setup=s)
