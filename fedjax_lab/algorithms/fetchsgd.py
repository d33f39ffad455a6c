"""FetchSGD (Rothchild, Panda, Ullah, Ivkin, Stoica, Braverman, Gonzalez, Arora; ICML 2020),
Algorithm 1: momentum and error feedback in count-sketch space, stateless clients.

Round t, sampled clients c_1 ... c_W, count sketch S (r x c, hashes shared via a key), server lr eta
and momentum rho (the Setup's server optimizer, which must be "sgd": FetchSGD is SGD with momentum
in sketch space; eta follows its lr_schedule):

    client i:   g_i = gradient of its loss at w_t on a batch;  sends S(g_i)        (r c floats)
    server:     S^t   = sum_i p_i S(g_i) / sum_i p_i          (= S(mean g): S is linear)
                S_u   = rho S_u + S^t                          momentum, in sketch space
                S_e   = S_e + eta S_u                          error accumulation, in sketch space
                Delta = Top-k(U(S_e))                          unsketch: k heavy hitters
                S_e   = S_e - S(Delta)                         error feedback: remove what was applied
                S_u   = S_u - S(u_Delta)                       momentum masking (u_Delta = U(S_u) on
                                                               Delta's support)
                w_{t+1} = w_t - Delta

Clients keep nothing between rounds: the paper's point is that momentum and error live on the
server, so clients that participate once still contribute. p_i = 1 (the paper's 1/W average,
`weighting="uniform"`, default) or n_i (`weighting="examples"`); either way the server weights the
tables, and the weighted sum of tables is the table of the weighted sum.

Variants (named options):
  * `second_round=True`: the server picks `num_candidates` (>= k) candidates from U(S_e) and asks
    the round's clients for the exact values of their g_i there (a second, k-float upload; the
    candidate indices go down). Only the current round's contribution eta * g can be made exact
    (clients are stateless; older rounds live only in the sketch), so a candidate's value is
    U(S_e - eta S^t)_j + eta g_j and the k largest of these are applied. With rho = 0 and no carried
    error this is the exact two-round top-k of Ivkin et al. (2019).
  * `LocalWork(local_steps > 1)` (our generalization; Algorithm 1 takes one gradient): the client
    runs local training with the Setup's client optimizer and sends g_i = (w_t - w_i) / client_lr,
    the sum of its local gradients under constant-lr SGD. Stragglers (`LocalWork.stragglers`) send
    their partial work's g_i unless `drop_stragglers=True`.
  * `per_client_sketch=False`: the server sketches sum_i p_i g_i once instead of summing C tables;
    identical up to float rounding (linearity), C times cheaper to simulate.

Paper vs. official code (CommEfficient, `fed_aggregator._server_helper_sketched`): the code does
not subtract S(Delta); it zeroes every cell of S_e and S_u that a coordinate of Delta hashes to
("this should work but doesn't (model diverges)" is its comment on subtracting). It also applies
eta after unsketching (S_e += S_u, w -= eta Delta), which is the same for a constant eta. The paper's
rule is the default (`masking="subtract"`); the code's is `masking="zero_cells"`.
`momentum_masking=False` leaves S_u alone (Algorithm 1 as printed lists no masking of S_u).
Client weights: the paper averages the W tables (1/W, `weighting="uniform"`, default). The code
weights clients by size: each client sends the sketch of its *summed* gradient (its mean gradient
times its batch size, `fed_worker.local_step`) and the server divides the summed tables by the
round's total example count (`FedModel._call_train`), so client i counts as many times as the
examples it used: min(n_i, local_batch_size), or n_i with `local_batch_size=-1` (the whole local
dataset as one batch). `weighting="examples"` (p_i = n_i, tables divided by sum_i n_i) is that
rule when clients use all their data; when every client has at least B examples the code's
weights are equal and `"uniform"` is the match.
What we measured (digits, MLP d = 4,810, tests/test_fetchsgd.py, experiments/reproduce/fetchsgd.py):
subtracting is exact bookkeeping and trains when the sketch is large (r = 3, c = 2d, k = d/50), but
at 10x compression it diverges, as the code's comment says: with one row, two selected coordinates
sharing a cell both receive the cell's value and subtracting both over-corrects (the cell flips
sign and grows); with more rows, noisy estimates grow the error ||e - Delta|| round after round.
Zeroing cells forgets the other coordinates' mass in those cells but is stable.

Shared pieces: sampling and batches (`participate`), the clients' local training
(`skeleton.local_delta` mapped by `skeleton.map_clients`) and the weights p_i (`client_weights`)
are the round skeleton's. The rest is not: the server's state and step live in sketch space (S_u,
S_e; no server optimizer acts on w), and the second round needs the raw g_i after unsketching, so
the sketch is no stateless uplink followed by an aggregator.

Communication per round: up, W r c float32 (+ W k float32 in the second round); down, the dense
model to each of the W clients (4 d bytes; sparse downloads of the changed weights are not
modelled) (+ W k int32 candidate indices in the second round).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_lab import compression as cz
from fedjax_lab.extend import (Algorithm, Cohort, LocalWork, Model, Optimizer, Setup, begin_round,
                               client_params_of_global, client_weights, comm, defaults, flatten,
                               local_delta, map_clients, resolve, schedule, validate,
                               weighted_mean_scalar)


SCATTER_BUDGET = 1 << 26   # values per batched scatter-add (256 MB of float32) when sketching clients

# One gradient of batch 10 per client, 10 clients averaged uniformly (the paper's 1/W), eta = 0.1,
# rho = 0.9; shared with local top-k, FetchSGD's baseline.
SKETCHED = Setup(cohort=Cohort(10, sampling="uniform", weighting="uniform"),
                 work=LocalWork(batch_size=10, local_steps=1),
                 client_opt=Optimizer("sgd", lr=1.0),
                 server_opt=Optimizer("sgd", lr=0.1, momentum=0.9))
USES = {"cohort", "work", "client_opt", "server_opt"}    # the sketch is the uplink


@struct.dataclass
class FetchSGDState:
    params: Any
    momentum: jax.Array         # S_u [rows, cols]
    error: jax.Array            # S_e [rows, cols]
    sketch: cz.CountSketch      # hash seeds shared by server and clients
    round: jax.Array


def check_client_opt(client_opt: Optimizer):
    """g_i = (w_t - w_i) / client_lr needs the client optimizer's learning rate."""
    if client_opt.tx is not None:
        raise ValueError("setup.client_opt: the message is (w_t - w_i) / client_lr, so it needs "
                         "a named optimizer with its lr (Optimizer('sgd', lr=...)), not a custom "
                         "optax one")


def client_gradients(model, client_opt: Optimizer, w_t, data, part, key):
    """[C, d] flat g_i = (w_t - w_i) / client_lr after each client's local training (one SGD step:
    its batch gradient), and the [C] local losses F_k and local objectives."""
    client = local_delta(model, client_opt.build("client_optimizer"))
    delta, loss, objective = map_clients(client, w_t, data, part, key)
    flat = jax.vmap(lambda t: flatten(t)[0])(delta)          # w_i - w_t, negated exactly below
    return -flat / client_opt.lr, loss, objective


def normalized(p):
    total = jnp.sum(p)
    return jnp.where(total > 0, p / jnp.where(total > 0, total, 1.0), 0.0)


def remove_support(cs, table, idx, values, masking: str):
    """Take a sparse vector's contribution out of a table: subtract its sketch, or zero its cells."""
    if masking == "subtract":
        return table - cz.sketch_sparse(cs, idx, values)
    buckets, _ = cz.hashes(cs, idx)
    return table.at[jnp.arange(cs.rows)[:, None], buckets].set(0.0)


def num_params(model, data) -> int:
    params = jax.eval_shape(model.init, jax.random.key(0), data.x[:1])
    return sum(int(x.size) for x in jax.tree.leaves(params))


@defaults(SKETCHED, uses=USES)
def fetchsgd(model: Model, *, k: int = 100, sketch_rows: int = 5, sketch_cols: int = 1000,
             second_round: bool = False, num_candidates: int = 0, masking: str = "subtract",
             momentum_masking: bool = True, per_client_sketch: bool = True,
             setup: Setup = Setup()) -> Algorithm:
    """FetchSGD (see module docstring). num_candidates = 0 means k (second round only).
    eta = server_lr and rho = server_momentum may be traced."""
    s = resolve(setup, fetchsgd)
    if s.server_opt.name != "sgd":
        raise ValueError(f"setup.server_opt must be Optimizer('sgd', lr=eta, momentum=rho): "
                         f"FetchSGD is SGD with momentum in sketch space, got "
                         f"{s.server_opt.name!r}")
    check_client_opt(s.client_opt)
    eta, rho = s.server_opt.lr, s.server_opt.momentum
    validate.fraction("server_momentum", rho, closed_right=False)
    validate.positive("k", k, integer=True)
    validate.positive("sketch_rows", sketch_rows, integer=True)
    validate.positive("sketch_cols", sketch_cols, integer=True)
    validate.one_of("masking", masking, {"subtract", "zero_cells"})
    if not isinstance(num_candidates, int) or num_candidates < 0:
        raise ValueError(f"num_candidates must be an integer >= 0 (0 means k), got {num_candidates!r}")
    if num_candidates and num_candidates < k:
        raise ValueError(f"num_candidates must be >= k={k} (or 0 for k), got {num_candidates}")
    m = num_candidates or k
    eta_at = schedule(eta, s.server_opt.lr_schedule)
    drop = bool(s.work.drop_stragglers)         # None: keep stragglers' partial gradients

    def check(data):
        s.check(data)
        d = num_params(model, data)
        if m > d:
            raise ValueError(f"k={k} (num_candidates={m}) exceeds the number of model parameters "
                             f"d={d}; expected k <= num_candidates <= d")

    def init(key, data):
        check(data)
        k_model, k_sketch = jax.random.split(key)
        params = model.init(k_model, data.x[:1])
        cs = cz.count_sketch(k_sketch, flatten(params)[0].shape[0], rows=sketch_rows,
                             cols=sketch_cols)
        shape = (sketch_rows, sketch_cols)     # two buffers: the driver donates the state
        return FetchSGDState(params=params, momentum=jnp.zeros(shape), error=jnp.zeros(shape),
                             sketch=cs, round=jnp.zeros((), jnp.int32))

    def round(state, data, key):
        part, data, (k_train,) = begin_round(key, data, s)
        cs = state.sketch
        lr = eta_at(state.round) if callable(eta_at) else eta_at
        g, losses, objectives = client_gradients(model, s.client_opt, state.params, data, part,
                                                 k_train)
        p = client_weights(part, s.cohort, drop_stragglers=drop)
        pn = normalized(p)
        if per_client_sketch:                # clients in chunks of <= 2^26 scattered values
            chunk = max(1, SCATTER_BUDGET // (cs.rows * cs.dim))
            table = jnp.tensordot(pn, cz.sketch_clients(cs, g, chunk=chunk), axes=1)
        else:
            table = cz.sketch(cs, pn @ g)                                 # S(sum_i p_i g_i)
        s_u = rho * state.momentum + table
        s_e = state.error + lr * s_u
        if second_round:
            history = s_e - lr * table

            def exact(cand):                         # clients send g_i[cand]; server weights them
                return cz.query(cs, history, cand) + lr * (pn @ g[:, cand])
            idx, delta = cz.heavy_hitters(cs, s_e, k, num_candidates=m, exact=exact)
        else:
            idx, delta = cz.heavy_hitters(cs, s_e, k)
        s_e = remove_support(cs, s_e, idx, delta, masking)
        if momentum_masking:
            s_u = remove_support(cs, s_u, idx, cz.query(cs, s_u, idx), masking)
        flat, unravel = flatten(state.params)
        params = unravel(flat.at[idx].add(-delta))
        num_up = jnp.sum(p > 0)
        up = cs.num_bytes + (4 * m if second_round else 0)
        down = 4 * cs.dim + (4 * m if second_round else 0)
        metrics = dict(local_loss=weighted_mean_scalar(losses, p),
                       local_objective=weighted_mean_scalar(objectives, p),
                       clients_aggregated=num_up.astype(jnp.float32),
                       update_norm=jnp.linalg.norm(delta),
                       **comm.round_metrics(up_per_client=up, down_per_client=down,
                                            num_up=num_up, num_down=s.cohort.clients_per_round))
        return state.replace(params=params, momentum=s_u, error=s_e, round=state.round + 1), metrics

    return Algorithm(init=init, round=round, model=model,
                     client_params=client_params_of_global(lambda st: st.params),
                     global_params=lambda st: st.params, check=check, setup=s)
