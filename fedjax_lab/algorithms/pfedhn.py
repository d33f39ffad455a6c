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

pFedHN-PC ("personalized classifier"): h generates every layer but the head; client i keeps a private
head (a row of the state, with its own persistent optimizer state), trained jointly with theta_i by
the same inner optimizer; only the generated body's theta_i / Delta_i travel.
Which params are the head: exactly the leaves `model.head` reads (read from its jaxpr; the zoo's
mlp: "out", cnn / cnn_cifar: "fc"); a model whose params are all head (logistic) is refused.

Defaults (the official trainer, github.com/AvivSham/pFedHN, experiments/pfedhn/trainer.py):
  * inner optimizer: the Setup's client optimizer (SGD lr 5e-3 momentum 0.9) after
    clip_by_global_norm(`inner_clip` = 50) and weight decay `inner_wd` = 5e-5 (torch's SGD adds
    wd * theta after the clip: `with_decay`); k = 50 steps of batch 64 (Setup.work); a fresh
    optimizer state every round (PC's head: kept in its row).
  * phi: the Setup's server optimizer (SGD lr 1e-2 momentum 0.9) with weight decay `server_wd` =
    1e-3; embeddings: the same rule at lr `embed_lr` (None: the server lr, as the code's
    embed_lr=None), momentum rows of their own; the clip at `clip` = 50 is over phi and the
    embeddings together (torch's clip_grad_norm_ over hnet.parameters()).
  * h: hidden 100, n_hidden 3, embed_dim = int(1 + N / 4) (embed_dim=-1 in the code); e_i ~ N(0, I).

Paper vs. official code (the choices here):
  * The code draws one client per step; the default here is a cohort per round (Setup.cohort,
    vmapped, phi's gradient the p-weighted mean, p uniform by default); `Cohort(clients_per_round=1)`
    is the code's one-client step exactly (same clip, same optimizer steps).
  * Each embedding gets its own client's whole gradient (not divided by the cohort size), so its
    step does not depend on C; the clip norm is that of (g_phi, all sampled g_e).
  * torch's dense SGD decays every embedding row and its momentum at every step; here only the
    sampled rows change (what a row store for millions of clients needs).
  * PC: the code clips only the body's gradient and inits each client's head independently (its
    official PC lr is 5e-2); here the head takes the whole client optimizer (its clip included, on
    its own gradient) and every head starts at model.init's head; lr 1e-2 for both variants.
  * Stragglers (LocalWork.stragglers) send the Delta_i of their partial work (drop_stragglers=True
    leaves them out of g_phi and of the embedding step). Accuracy: `client_params` is h(e_i; phi)
    (PC: with the head); core/meta.adapted_evaluation reports it pooled (sum correct / sum n, the
    official metric) and as the mean over clients.
  * Host store (core/store.py): rows start "fresh" there (init_row cannot know the client); a
    fresh row takes its N(0, I) embedding from fold_in(embed_key, id) when first sampled, the same
    value `init` gives on device. A never-sampled fresh row deploys h(0; phi).

New clients (the paper's generalization experiment; no released code): `alg.new_client(...)` gives
adapt(state, support, ids) for core/meta.adapted_evaluation: phi frozen, a fresh embedding (the mean
of the trained ones; PC: and a head, the mean of the trained heads) learned by SGD with momentum on
the new client's own data, all new clients at once (vmapped).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.extend import (ClientRows, Cohort, LocalWork, Model, Optimizer, RowAlgorithm,
                               RowRound, Setup, algorithm_config, batch_loss, client_keys,
                               client_weights, comm, defaults, draw_batches, local_train,
                               participate, resolve, row_algorithm, sample_ids, tree_sq_norm,
                               tree_sub, validate, weighted_mean_scalar)
from fedjax_lab.models.hypernet import GENERATORS, head_leaves, hypernetwork


PFEDHN = Setup(cohort=Cohort(clients_per_round=10, weighting="uniform"),
               work=LocalWork(batch_size=64, local_steps=50),
               client_opt=Optimizer("sgd", lr=5e-3, momentum=0.9),
               server_opt=Optimizer("sgd", lr=1e-2, momentum=0.9))
USES = frozenset({"cohort", "work", "client_opt", "server_opt"})


def with_decay(tx, weight_decay, clip=None):
    """torch's SGD(weight_decay) after clip_grad_norm_: clip g, add weight_decay * theta, then tx."""
    parts = [] if clip is None else [optax.clip_by_global_norm(clip)]
    parts += [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    return optax.chain(*parts, tx)


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
    models/hypernet.py). `setup`: cohort, local work, client / server optimizers."""
    return _build(model, pfedhn, setup, False, **_own(locals()))


@defaults(PFEDHN, uses=USES, model="mlp")
def pfedhn_pc(model: Model, *, embed_dim: Optional[int] = None, hidden: int = 100,
              n_hidden: int = 3, embed_lr: Optional[float] = None, clip: float = 50.0,
              server_wd: float = 1e-3, inner_wd: float = 5e-5, inner_clip: Optional[float] = 50.0,
              generator: str = "per_leaf", chunk: int = 16384,
              setup: Setup = Setup()) -> HyperAlgorithm:
    """pFedHN-PC: h generates the body, each client keeps a private head (module docstring);
    the keywords are pfedhn's."""
    return _build(model, pfedhn_pc, setup, True, **_own(locals()))


def _own(kw):
    return {k: v for k, v in kw.items() if k not in ("model", "setup")}


def _build(model, factory, setup, pc: bool, *, embed_dim, hidden, n_hidden, embed_lr, clip,
           server_wd, inner_wd, inner_clip, generator, chunk) -> HyperAlgorithm:
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
    s = resolve(setup, factory)
    cohort, work = s.cohort, s.work
    if embed_lr is not None and s.server_opt.tx is not None:
        raise ValueError(f"embed_lr={embed_lr!r} needs a named server optimizer (Optimizer(name, "
                         f"lr=...)) to take its rule from, got the custom optax optimizer "
                         f"{s.server_opt.name!r}; expected embed_lr=None (the embeddings then use it)")
    client_tx = with_decay(s.client_opt.build("client_optimizer"), inner_wd, inner_clip)
    server_tx = with_decay(s.server_opt.build("server_optimizer"), server_wd)
    embed_opt = s.server_opt if embed_lr is None else dataclasses.replace(s.server_opt, lr=embed_lr)
    embed_tx = with_decay(embed_opt.build("server_optimizer"), server_wd)
    keep_stragglers = not s.work.drop_stragglers

    @functools.lru_cache(maxsize=8)
    def layout(x_shape, x_dtype, d):
        """(h, merge(body, head) -> params, head_of(params)) for inputs [.., *x_shape], e_i in R^d."""
        x = jax.ShapeDtypeStruct((1,) + x_shape, x_dtype)
        leaves, treedef = jax.tree.flatten(jax.eval_shape(model.init, jax.random.key(0), x))
        is_head = head_leaves(model, x) if pc else [False] * len(leaves)
        body = [l for l, h in zip(leaves, is_head) if not h] if pc else \
            jax.tree.unflatten(treedef, leaves)           # pFedHN: h emits the params pytree
        hn = hypernetwork(body, embed_dim=d,
                          hidden=hidden, n_hidden=n_hidden, generator=generator, chunk=chunk)

        def merge(body, head):
            it_b, it_h = iter(body), iter(head)
            return jax.tree.unflatten(treedef, [next(it_h) if h else next(it_b) for h in is_head])

        head_of = lambda p: [l for l, h in zip(jax.tree.leaves(p), is_head) if h]
        return hn, merge, head_of

    dim = lambda n: embed_dim or int(1 + n / 4)
    # the inputs' shape rides in the state as one zero example, static under jit (a zero-size array
    # would be smaller, but orbax refuses to checkpoint one)
    lay = lambda server, d: layout(tuple(server["x_like"].shape[1:]), server["x_like"].dtype, d)

    def check(data):
        s.check(data)
        layout(tuple(data.x.shape[1:]), data.x.dtype, dim(data.num_clients))

    def base_embeddings(server, ids, d):
        """e_i ~ N(0, I) from fold_in(embed_key, i): what `init` stores, what a fresh row takes."""
        k = jax.random.wrap_key_data(server["embed_key"])
        return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(k, i), (d,)))(ids)

    def init_server(key, data):
        check(data)
        k_phi, k_embed, k_model = jax.random.split(key, 3)
        server = {"x_like": jnp.zeros((1,) + data.x.shape[1:], data.x.dtype),
                  "embed_key": jax.random.key_data(k_embed), "round": jnp.zeros((), jnp.int32)}
        hn, _, head_of = lay(server, dim(data.num_clients))
        server.update(phi=hn.init(k_phi), embed0=jnp.zeros((hn.embed_dim,), jnp.float32))
        server["opt"] = server_tx.init(server["phi"])
        if pc:
            server["head0"] = head_of(model.init(k_model, data.x[:1]))
        return server

    def row_of(server, e, fresh):
        row = {"embed": e, "embed_opt": embed_tx.init(e), "fresh": fresh}
        if pc:
            row.update(head=server["head0"], head_opt=client_tx.init(server["head0"]))
        return row

    def init(key, data):
        server = init_server(key, data)
        e = base_embeddings(server, jnp.arange(data.num_clients), dim(data.num_clients))
        return ClientRows(server=server, rows=jax.vmap(lambda e_: row_of(server, e_, jnp.bool_(False)))(e))

    def fresh_row(server):
        return row_of(server, jnp.zeros_like(server["embed0"]), jnp.bool_(True))

    def generate(phi, hn, e):
        return jax.vmap(hn.apply, in_axes=(None, 0))(phi, e)

    def step(server, rows, ids, data, key):
        hn, merge, _ = lay(server, rows["embed"].shape[-1])
        k_part, k_train = jax.random.split(key)
        part = participate(k_part, data, cohort, work, ids=ids)
        num = ids.shape[0]
        if part.ids.shape[0] != num:     # a client mesh pads the round with step-less dummies
            rows = jax.tree.map(lambda x: jnp.concatenate(
                [x, jnp.repeat(x[:1], part.ids.shape[0] - num, axis=0)]), rows)
        e = jnp.where(rows["fresh"][:, None], base_embeddings(server, part.ids, hn.embed_dim),
                      rows["embed"])
        theta, pull = jax.vjp(lambda phi, e_: generate(phi, hn, e_), server["phi"], e)
        args = (data.x, data.y, part.batches.idx, part.batches.step_mask,
                client_keys(k_train, part.ids))
        if pc:      # (theta_i, head_i) trained together; the head's optimizer state persists
            loss = lambda p, xb, yb, rng: batch_loss(model, merge(*p), xb, yb, rng, train=True)
            train = local_train(model, pair(client_tx, client_tx), loss_fn=loss)
            opt0 = (jax.vmap(client_tx.init)(theta), rows["head_opt"])
            res = jax.vmap(train, in_axes=(0, None, None, 0, 0, 0, 0))(
                (theta, rows["head"]), *args, opt0)
            theta_new = res.params[0]
        else:
            res = jax.vmap(local_train(model, client_tx), in_axes=(0, None, None, 0, 0, 0))(
                theta, *args)
            theta_new = res.params
        delta = tree_sub(theta, theta_new)                        # Delta_i, sent up
        p = client_weights(part, cohort, drop_stragglers=not keep_stragglers)
        p_bar = p / jnp.maximum(jnp.sum(p), 1e-30)
        per_row = lambda w, v: v * w.reshape((-1,) + (1,) * (v.ndim - 1))
        g_phi = pull(jax.tree.map(functools.partial(per_row, p_bar), delta))[0]
        g_e = per_row((p > 0).astype(jnp.float32), pull(delta)[1])
        norm = jnp.sqrt(tree_sq_norm(g_phi) + jnp.sum(g_e * g_e))
        c = jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-30))
        upd, opt = server_tx.update(jax.tree.map(lambda g: g * c, g_phi), server["opt"],
                                    server["phi"])
        server = dict(server, phi=optax.apply_updates(server["phi"], upd), opt=opt,
                      round=server["round"] + 1)
        e_upd, e_opt = jax.vmap(embed_tx.update)(g_e * c, rows["embed_opt"], e)
        moved = p > 0
        keep = lambda new, old: jax.tree.map(
            lambda a, b: jnp.where(moved.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)
        new_rows = dict(rows, embed=keep(e + e_upd, e), embed_opt=keep(e_opt, rows["embed_opt"]),
                        fresh=rows["fresh"] & ~moved)
        if pc:
            new_rows.update(head=res.params[1], head_opt=res.opt_state[1])
        one = jax.tree.map(lambda v: v[0], theta)
        sent = jnp.sum(moved)
        metrics = dict(local_loss=weighted_mean_scalar(res.loss, p), grad_norm=norm,
                       clients_aggregated=sent.astype(jnp.float32),
                       **comm.round_metrics(up_per_client=comm.dense_bytes(one),
                                            down_per_client=comm.dense_bytes(one),
                                            num_up=sent, num_down=num))
        return server, jax.tree.map(lambda v: v[:num], new_rows), metrics

    def deploy(server, rows):
        hn, merge, _ = lay(server, rows["embed"].shape[-1])
        theta = generate(server["phi"], hn, jnp.where(rows["fresh"][:, None], 0.0, rows["embed"]))
        return jax.vmap(merge)(theta, rows["head"]) if pc else theta

    spec = RowRound(init_server=init_server, init_row=fresh_row,
                    sample=lambda data, key: sample_ids(jax.random.split(key, 3)[0], data, cohort),
                    step=step, params=deploy)
    name = factory.__name__
    config = algorithm_config(name, model, s, uses=USES)
    alg = row_algorithm(spec, name=name, model=model, check=check, config=config)

    def new_client(*, steps: int = 50, lr: float = 1e-2, batch_size: Optional[int] = None,
                   momentum: float = 0.9, seed: int = 0):
        """adapt(state, support, ids) -> params [K, ...] of clients `ids` of `support`: phi frozen,
        e (PC: and the head) learned from the trained clients' mean by `steps` SGD steps."""
        validate.positive("steps", steps, integer=True)
        validate.positive("lr", lr)
        b = work.batch_size if batch_size is None else batch_size
        validate.positive("batch_size", b, integer=True)
        tx = optax.sgd(lr, momentum=momentum)

        def adapt(state, support, ids):
            server, rows = state.server, state.rows
            hn, merge, _ = lay(server, rows["embed"].shape[-1])
            trained = (~rows["fresh"]).astype(jnp.float32)
            mean = lambda v: jnp.tensordot(trained, v, axes=1) / jnp.maximum(jnp.sum(trained), 1.0)
            start = {"e": mean(rows["embed"])}
            if pc:
                start["head"] = jax.tree.map(mean, rows["head"])
            full = lambda q: (merge(hn.apply(server["phi"], q["e"]), q["head"]) if pc
                              else hn.apply(server["phi"], q["e"]))
            f = lambda q, xb, yb, rng: batch_loss(model, full(q), xb, yb, rng, train=True)
            key = jax.random.key(seed)
            bt = draw_batches(key, support, ids, batch_size=b, local_steps=steps)
            res = jax.vmap(local_train(model, tx, loss_fn=f), in_axes=(None, None, None, 0, 0, 0))(
                start, support.x, support.y, bt.idx, bt.step_mask, client_keys(key, ids))
            return jax.vmap(full)(res.params)
        return adapt

    def hypernet(sample_x, num_clients):
        return layout(tuple(sample_x.shape[1:]), sample_x.dtype, dim(num_clients))[0]

    fields = {f.name: getattr(alg, f.name) for f in dataclasses.fields(alg)}
    fields.update(init=init, setup=s)
    return HyperAlgorithm(**fields, new_client=new_client, hypernet=hypernet)


def pair(tx_a: optax.GradientTransformation, tx_b: optax.GradientTransformation):
    """An optax transformation of a pair (a, b): tx_a on a, tx_b on b, state (state_a, state_b)."""
    def init(p):
        return (tx_a.init(p[0]), tx_b.init(p[1]))

    def update(g, state, p=None):
        ua, sa = tx_a.update(g[0], state[0], None if p is None else p[0])
        ub, sb = tx_b.update(g[1], state[1], None if p is None else p[1])
        return (ua, ub), (sa, sb)
    return optax.GradientTransformation(init, update)
