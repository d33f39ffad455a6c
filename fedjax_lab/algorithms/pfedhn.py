"""pFedHN and pFedHN-PC (Shamsian, Navon, Fetaya, Chechik, "Personalized Federated Learning using
Hypernetworks", ICML 2021, Algorithm 1).

The server holds a hypernetwork h(.; phi) (models/hypernet.py: it emits the target model's params
pytree by shape) and an embedding e_i per client, the rows [N, d] of the state. Objective:

    min_{phi, e_1..e_N}  sum_i L_i(h(e_i; phi))

Round t, sampled clients S_t, for i in S_t (vmapped):
    theta_i   = h(e_i; phi)                                   sent down
    theta~_i  = k steps of the client optimizer on L_i from theta_i   (k = LocalWork.local_steps)
    Delta_i   = theta_i - theta~_i                            sent up
    g_phi     = sum_i p_i (d theta_i / d phi)^T Delta_i / sum_i p_i,   g_{e_i} = (d theta_i / d e_i)^T Delta_i
    (g_phi, g_e) <- (g_phi, g_e) * min(1, clip / ||(g_phi, g_e)||)    (joint norm, clip = 50)
    phi <- ServerOpt(phi, g_phi),  e_i <- EmbedOpt(e_i, g_{e_i})
Both products are one `jax.vjp` of the vmapped h (never a Jacobian). With k = 1 plain SGD step of
size eta, Delta_i = eta grad L_i(theta_i) and g_phi = eta grad_phi L_i(h(e_i; phi)): the chain rule.
pFedHN-PC ("personalized classifier"): h generates all but the head (the leaves `model.head` reads;
mlp: "out", cnn: "fc"; an all-head model such as logistic is refused); client i keeps its head and
the head's optimizer state in its row and trains it with theta_i; only theta_i / Delta_i travel.

Defaults (the official trainer, github.com/AvivSham/pFedHN, experiments/pfedhn/trainer.py): inner
optimizer the client optimizer (SGD lr 5e-3 momentum 0.9) after clip_by_global_norm(`inner_clip` =
50) and weight decay `inner_wd` = 5e-5 (`with_decay`), fresh every round, k = 50 steps of batch 64;
phi: the server optimizer (SGD lr 1e-2 momentum 0.9) with weight decay `server_wd` = 1e-3; each e_i
the same rule at `embed_lr` (None: the server lr); `clip` = 50 over phi and the embeddings together
(clip_grad_norm_ over hnet); h: hidden 100, n_hidden 3, d = int(1 + N / 4); e_i ~ N(0, I).

Paper vs. official code (the choices here):
  * The code draws one client per step; here a cohort per round (Setup.cohort, vmapped, g_phi the
    p-weighted mean, p uniform by default); `Cohort(clients_per_round=1)` is the code's step exactly.
  * Each e_i gets its client's whole gradient (not divided by the cohort size). torch's dense SGD
    decays every embedding and its momentum at every step; here only the sampled rows change.
  * PC: the code clips only the body's gradient and inits each head independently (PC lr 5e-2);
    here the head takes the client optimizer too, clipped on its own (optax.multi_transform over
    (body, head)), and every head starts at model.init's head.
  * Stragglers send the Delta_i of their partial work (LocalWork(drop_stragglers=True) leaves them
    out). Setup.attack: label flipping poisons the attackers' data, an update attack their Delta_i.
  * Host store (core/store.py): rows start "fresh" and take e_i from fold_in(embed_key, i) when
    first sampled, as `init` does; a never-sampled fresh row deploys h(0; phi).
New clients (the paper's generalization experiment; no released code): `alg.new_client(...)` gives
adapt(state, support, ids) for core/meta.adapted_evaluation: phi frozen, a fresh embedding (the
trained ones' mean; PC: and head, the trained heads' mean) learned by SGD with momentum on each new
client's own data, all at once (vmapped).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_lab.extend import (ClientRows, Cohort, LocalWork, Model, Optimizer, RowAlgorithm,
                               RowRound, ServerRound, Setup, batch_loss, client_keys,
                               client_weights, comm, defaults, draw_batches, local_train, resolve,
                               row_algorithm, tree_scale, tree_sq_norm, tree_sub, tree_where,
                               validate, weighted_mean_scalar)
from fedjax_lab.models.hypernet import GENERATORS, head_leaves, hypernetwork

PFEDHN = Setup(cohort=Cohort(clients_per_round=10, weighting="uniform"),
               work=LocalWork(batch_size=64, local_steps=50),
               client_opt=Optimizer("sgd", lr=5e-3, momentum=0.9),
               server_opt=Optimizer("sgd", lr=1e-2, momentum=0.9))
USES = frozenset({"cohort", "work", "client_opt", "server_opt", "attack"})


def with_decay(tx, weight_decay, clip=None):
    """torch's SGD(weight_decay) after clip_grad_norm_: clip g, add weight_decay * theta, then tx."""
    parts = [] if clip is None else [optax.clip_by_global_norm(clip)]
    parts += [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    return optax.chain(*parts, tx)


@struct.dataclass
class HyperServer:
    """The server's state; the input's shape and d ride as static fields (no zero-size arrays,
    which orbax would not checkpoint)."""
    phi: Any                  # h's params
    opt: Any                  # ServerOpt's state of phi
    embed_key: jax.Array      # key data: e_i ~ N(0, I) from fold_in(embed_key, i)
    round: jax.Array
    head0: Any = None         # PC: model.init's head leaves, where every head starts
    x_like: Any = struct.field(pytree_node=False, default=None)   # ShapeDtypeStruct of x[:1]
    embed_dim: int = struct.field(pytree_node=False, default=0)   # d


@struct.dataclass
class HyperRow:
    """Client i's row of ClientRows.rows (stacked [N, ...])."""
    embed: jax.Array          # e_i [d]
    embed_opt: Any            # EmbedOpt's state of e_i
    fresh: jax.Array          # not sampled yet (host store): e_i is still to be drawn
    head: Any = None          # PC: the private head's leaves
    head_opt: Any = None      # PC: the head's part of the inner optimizer's state


@dataclasses.dataclass(frozen=True, eq=False)
class Hyper:
    """What a pfedhn / pfedhn_pc call fixes: the skeleton (model, setup), h, the optimizers."""
    rnd: ServerRound
    pc: bool
    embed_dim: Optional[int]                  # d (None: int(1 + N / 4))
    hidden: int
    n_hidden: int
    generator: str
    chunk: int
    clip: float
    client_tx: optax.GradientTransformation   # the inner optimizer (PC: of the body and the head)
    server_tx: optax.GradientTransformation   # phi's
    embed_tx: optax.GradientTransformation    # each e_i's

    def dim(self, num_clients):
        return self.embed_dim or int(1 + num_clients / 4)


def layout(hp: Hyper, x_like, d: int):
    """(h with e_i in R^d, merge(body, head) -> params, head_of(params)) for inputs like x_like."""
    model = hp.rnd.model
    leaves, treedef = jax.tree.flatten(jax.eval_shape(model.init, jax.random.key(0), x_like))
    is_head = head_leaves(model, x_like) if hp.pc else [False] * len(leaves)
    target = [l for l, h in zip(leaves, is_head) if not h] if hp.pc else \
        jax.tree.unflatten(treedef, leaves)           # pFedHN: h emits the params pytree
    hn = hypernetwork(target, embed_dim=d, hidden=hp.hidden, n_hidden=hp.n_hidden,
                      generator=hp.generator, chunk=hp.chunk)

    def merge(body, head):
        it_b, it_h = iter(body), iter(head)
        return jax.tree.unflatten(treedef, [next(it_h) if h else next(it_b) for h in is_head])
    return hn, merge, lambda params: [l for l, h in zip(jax.tree.leaves(params), is_head) if h]


def base_embeddings(server: HyperServer, ids):
    """e_i ~ N(0, I) from fold_in(embed_key, i): what `init` stores, what a fresh row takes."""
    k = jax.random.wrap_key_data(server.embed_key)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(k, i), (server.embed_dim,)))(ids)


def init_server(hp: Hyper, key, data) -> HyperServer:
    hp.rnd.check(data)
    k_phi, k_embed, k_model = jax.random.split(key, 3)
    x_like = jax.ShapeDtypeStruct((1,) + data.x.shape[1:], data.x.dtype)
    hn, _, head_of = layout(hp, x_like, hp.dim(data.num_clients))
    phi = hn.init(k_phi)
    return HyperServer(phi=phi, opt=hp.server_tx.init(phi), embed_key=jax.random.key_data(k_embed),
                       round=jnp.zeros((), jnp.int32), x_like=x_like, embed_dim=hn.embed_dim,
                       head0=head_of(hp.rnd.model.init(k_model, data.x[:1])) if hp.pc else None)


def init_row(hp: Hyper, server: HyperServer, embed=None) -> HyperRow:
    """A client's first row from its e_i; embed=None: a fresh row (the host store's)."""
    e = jnp.zeros((server.embed_dim,), jnp.float32) if embed is None else embed
    row = HyperRow(embed=e, embed_opt=hp.embed_tx.init(e), fresh=jnp.bool_(embed is None))
    return row.replace(head=server.head0, head_opt=hp.client_tx.init(
        (None, server.head0)).inner_states["head"]) if hp.pc else row


def init(hp: Hyper, key, data) -> ClientRows:
    server = init_server(hp, key, data)
    e = base_embeddings(server, jnp.arange(data.num_clients))
    return ClientRows(server=server, rows=jax.vmap(lambda e_i: init_row(hp, server, e_i))(e))


def local_training(hp: Hyper, merge, theta, rows: HyperRow, data, part, k_train):
    """theta~_i: the inner optimizer's steps from theta_i (PC: on (theta_i, head_i), the head's
    optimizer state from its row, the body's fresh). Returns (theta~, LocalResult)."""
    b = part.batches
    args = (data.x, data.y, b.idx, b.step_mask, client_keys(k_train, part.ids))
    if not hp.pc:
        res = jax.vmap(local_train(hp.rnd.model, hp.client_tx), in_axes=(0, None, None, 0, 0, 0))(
            theta, *args)
        return res.params, res
    loss = lambda p, xb, yb, rng: batch_loss(hp.rnd.model, merge(*p), xb, yb, rng, train=True)
    opt0 = jax.vmap(hp.client_tx.init)((theta, rows.head))
    opt0 = opt0._replace(inner_states={**opt0.inner_states, "head": rows.head_opt})
    res = jax.vmap(local_train(hp.rnd.model, hp.client_tx, loss_fn=loss),
                   in_axes=(0, None, None, 0, 0, 0, 0))((theta, rows.head), *args, opt0)
    return res.params[0], res


def step(hp: Hyper, server: HyperServer, rows: HyperRow, ids, data, key):
    """A round over the sampled clients' rows (module docstring; RowRound.step)."""
    rnd, (hn, merge, _) = hp.rnd, layout(hp, server.x_like, server.embed_dim)
    # participate draws the batches and stragglers from the first of 2 streams and `sample` the
    # cohort from the first of 3: the key split of the round this replaced, kept for its numbers
    part, rows, data, (k_train,) = rnd.begin_rows(key, data, ids, rows, streams=2)
    e = jnp.where(rows.fresh[:, None], base_embeddings(server, part.ids), rows.embed)
    theta, pull = jax.vjp(lambda phi, e_: jax.vmap(hn.apply, in_axes=(None, 0))(phi, e_),
                          server.phi, e)                                 # theta_i = h(e_i; phi)
    theta_new, res = local_training(hp, merge, theta, rows, data, part, k_train)
    p = client_weights(part, rnd.setup.cohort, drop_stragglers=rnd.drops_stragglers)
    delta = rnd.setup.attack.corrupt(tree_sub(theta, theta_new), part.ids, data.num_clients, key,
                                     weights=p)                          # Delta_i, sent up
    per_row = lambda w, v: v * w.reshape((-1,) + (1,) * (v.ndim - 1))
    g_phi = pull(jax.tree.map(functools.partial(per_row, p / jnp.maximum(jnp.sum(p), 1e-30)),
                              delta))[0]
    moved = p > 0
    g_e = per_row(moved.astype(jnp.float32), pull(delta)[1])
    norm = jnp.sqrt(tree_sq_norm(g_phi) + jnp.sum(g_e * g_e))
    c = jnp.minimum(1.0, hp.clip / jnp.maximum(norm, 1e-30))            # the joint clip
    upd, opt = hp.server_tx.update(tree_scale(g_phi, c), server.opt, server.phi)
    server = server.replace(phi=optax.apply_updates(server.phi, upd), opt=opt,
                            round=server.round + 1)
    e_upd, e_opt = jax.vmap(hp.embed_tx.update)(g_e * c, rows.embed_opt, e)
    keep = functools.partial(jax.vmap(tree_where), moved)               # only reporters move
    rows = rows.replace(embed=keep(e + e_upd, e), embed_opt=keep(e_opt, rows.embed_opt),
                        fresh=rows.fresh & ~moved)
    if hp.pc:
        rows = rows.replace(head=res.params[1], head_opt=res.opt_state.inner_states["head"])
    one, sent = jax.tree.map(lambda v: v[0], theta), jnp.sum(moved)
    metrics = dict(local_loss=weighted_mean_scalar(res.loss, p), grad_norm=norm,
                   clients_aggregated=sent.astype(jnp.float32),
                   **comm.round_metrics(up_per_client=comm.dense_bytes(one),
                                        down_per_client=comm.dense_bytes(one), num_up=sent,
                                        num_down=ids.shape[0]))
    return server, rnd.end_rows(rows, ids), metrics


def deploy(hp: Hyper, server: HyperServer, rows: HyperRow):
    """h(e_i; phi) (PC: merged with head_i); a never-sampled fresh row deploys h(0; phi)."""
    hn, merge, _ = layout(hp, server.x_like, server.embed_dim)
    theta = jax.vmap(hn.apply, in_axes=(None, 0))(server.phi,
                                                  jnp.where(rows.fresh[:, None], 0.0, rows.embed))
    return jax.vmap(merge)(theta, rows.head) if hp.pc else theta


def new_client(hp: Hyper, *, steps: int = 50, lr: float = 1e-2, batch_size: Optional[int] = None,
               momentum: float = 0.9, seed: int = 0):
    """adapt(state, support, ids) -> params [K, ...] of clients `ids` of `support`: phi frozen,
    e (PC: and the head) learned from the trained clients' mean by `steps` SGD steps."""
    validate.positive("steps", steps, integer=True)
    validate.positive("lr", lr)
    b = hp.rnd.setup.work.batch_size if batch_size is None else batch_size
    validate.positive("batch_size", b, integer=True)
    model, tx = hp.rnd.model, optax.sgd(lr, momentum=momentum)

    def adapt(state, support, ids):
        server, rows = state.server, state.rows
        hn, merge, _ = layout(hp, server.x_like, server.embed_dim)
        trained = (~rows.fresh).astype(jnp.float32)
        mean = lambda v: jnp.tensordot(trained, v, axes=1) / jnp.maximum(jnp.sum(trained), 1.0)
        start = {"e": mean(rows.embed)}
        if hp.pc:
            start["head"] = jax.tree.map(mean, rows.head)
        full = lambda q: (merge(hn.apply(server.phi, q["e"]), q["head"]) if hp.pc
                          else hn.apply(server.phi, q["e"]))
        f = lambda q, xb, yb, rng: batch_loss(model, full(q), xb, yb, rng, train=True)
        key = jax.random.key(seed)
        bt = draw_batches(key, support, ids, batch_size=b, local_steps=steps)
        res = jax.vmap(local_train(model, tx, loss_fn=f), in_axes=(None, None, None, 0, 0, 0))(
            start, support.x, support.y, bt.idx, bt.step_mask, client_keys(key, ids))
        return jax.vmap(full)(res.params)
    return adapt


@dataclasses.dataclass(frozen=True, eq=False)
class HyperAlgorithm(RowAlgorithm):
    """A RowAlgorithm with `new_client(steps=, lr=, batch_size=, seed=)` -> adapt(state, support, ids)
    and `hypernet(sample_x, num_clients)` -> the HyperNetwork it trains."""
    new_client: Optional[Callable] = None
    hypernet: Optional[Callable] = None


@defaults(PFEDHN, uses=USES)
def pfedhn(model: Model, *, embed_dim: Optional[int] = None, hidden: int = 100, n_hidden: int = 3,
           embed_lr: Optional[float] = None, clip: float = 50.0, server_wd: float = 1e-3,
           inner_wd: float = 5e-5, inner_clip: Optional[float] = 50.0, generator: str = "per_leaf",
           chunk: int = 16384, setup: Setup = Setup()) -> HyperAlgorithm:
    """pFedHN (module docstring). embed_dim: d (None: int(1 + N / 4)); hidden, n_hidden: h's MLP;
    embed_lr: the embeddings' lr (None: the server lr); clip: the server's joint gradient clip;
    server_wd: weight decay of phi and e; inner_wd, inner_clip (None: none): the client
    optimizer's weight decay and gradient clip; generator "per_leaf" (one head per target leaf,
    the official code) or "chunked" (`chunk` outputs per chunk, for large targets;
    models/hypernet.py). `setup`: cohort, local work, client / server optimizers, attack."""
    return hyper_algorithm(model, setup, pfedhn, pc=False, **_own(locals()))


@defaults(PFEDHN, uses=USES, model="mlp")
def pfedhn_pc(model: Model, *, embed_dim: Optional[int] = None, hidden: int = 100,
              n_hidden: int = 3, embed_lr: Optional[float] = None, clip: float = 50.0,
              server_wd: float = 1e-3, inner_wd: float = 5e-5, inner_clip: Optional[float] = 50.0,
              generator: str = "per_leaf", chunk: int = 16384,
              setup: Setup = Setup()) -> HyperAlgorithm:
    """pFedHN-PC: h generates the body, each client keeps a private head (module docstring);
    the keywords are pfedhn's."""
    return hyper_algorithm(model, setup, pfedhn_pc, pc=True, **_own(locals()))


def _own(kw):
    return {k: v for k, v in kw.items() if k not in ("model", "setup")}


def hyper_algorithm(model, setup, factory, *, pc: bool, embed_dim, hidden, n_hidden, embed_lr,
                    clip, server_wd, inner_wd, inner_clip, generator, chunk) -> HyperAlgorithm:
    """pfedhn / pfedhn_pc: the arguments checked, the round's pieces assembled."""
    if embed_dim is not None:
        validate.positive("embed_dim", embed_dim, integer=True)
    validate.positive("hidden", hidden, integer=True)
    if isinstance(n_hidden, bool) or not isinstance(n_hidden, int) or n_hidden < 0:
        raise ValueError(f"n_hidden must be a non-negative integer, got {n_hidden!r}")
    if embed_lr is not None:
        validate.positive("embed_lr", embed_lr)
    validate.positive("clip", clip)
    validate.non_negative("server_wd", server_wd)
    validate.non_negative("inner_wd", inner_wd)
    if inner_clip is not None:
        validate.positive("inner_clip", inner_clip)
    validate.one_of("generator", generator, set(GENERATORS))
    validate.positive("chunk", chunk, integer=True)
    s = resolve(setup, factory, drop_stragglers=False)     # stragglers keep their partial work
    if embed_lr is not None and s.server_opt.tx is not None:
        raise ValueError(f"embed_lr={embed_lr!r} needs a named server optimizer (Optimizer(name, "
                         f"lr=...)) to take its rule from, got the custom optax optimizer "
                         f"{s.server_opt.name!r}; expected embed_lr=None (the embeddings then use it)")
    embed_opt = s.server_opt if embed_lr is None else dataclasses.replace(s.server_opt, lr=embed_lr)
    rnd = ServerRound(model, s)
    client_tx = with_decay(s.client_opt.build("client_optimizer"), inner_wd, inner_clip)
    if pc:      # (theta_i, head_i): the client optimizer on each, its own clip
        client_tx = optax.multi_transform({"body": client_tx, "head": client_tx}, ("body", "head"))
    hp = Hyper(rnd, pc, embed_dim, hidden, n_hidden, generator, chunk, clip, client_tx,
               server_tx=with_decay(s.server_opt.build("server_optimizer"), server_wd),
               embed_tx=with_decay(embed_opt.build("server_optimizer"), server_wd))

    def hypernet(sample_x, num_clients):
        x_like = jax.ShapeDtypeStruct((1,) + sample_x.shape[1:], sample_x.dtype)
        return layout(hp, x_like, hp.dim(num_clients))[0]

    def check(data):
        rnd.check(data)
        hypernet(data.x, data.num_clients)

    spec = RowRound(init_server=functools.partial(init_server, hp),
                    init_row=functools.partial(init_row, hp),
                    sample=functools.partial(rnd.sample, streams=3),    # see `step`
                    step=functools.partial(step, hp), params=functools.partial(deploy, hp))
    alg = row_algorithm(spec, model=model, check=check)
    fields = {f.name: getattr(alg, f.name) for f in dataclasses.fields(alg)}
    fields.update(init=functools.partial(init, hp), setup=s)
    return HyperAlgorithm(**fields, new_client=functools.partial(new_client, hp),
                          hypernet=hypernet)
