"""FedGen (Zhu, Hong, Zhou, "Data-Free Knowledge Distillation for Heterogeneous Federated
Learning", ICML 2021, Algorithm 1, Eq. 4-5).

The model splits as apply = head o features, h(x; theta) = g(f(x; theta^f); theta^p). The server
keeps a lightweight generator G_w(eps, y) -> z in feature space (models/generator.py) and the label
prior p_hat(y) from the clients' uploaded label counts n_{k,y}. Round t, sampled clients S_t:

  users (vmapped over S_t), from theta_t, on B real and B_G generated examples a step:
      min_theta  L_k(theta) + alpha E_{y~p_hat, eps} CE(g(G_w(eps, y); theta^p), y)          (Eq. 5)
  server: theta_{t+1} = the skeleton's aggregate of the theta_k (any aggregator, uplink, attack,
      server optimizer; FedAvg's (weighted) mean by default), and `generator_steps` Adam steps on
      min_w E_{y~p_hat} E_eps CE(softmax((1/|S_t|) sum_k g(G_w(eps, y); theta_k^p)), y)    (Eq. 4)
             + eta * exp(-mean_{i,j} ||eps_i - eps_j||^2_mean * |G(eps_i) - G(eps_j)|_mean)
      (the diversity term of Mao et al. 2019 as the code writes it: l2 distance of the noises,
      l1 of the outputs, each a mean over coordinates), the teacher being the ensemble of the
      uploaded heads theta_k^p (vmapped), p_hat(y) = sum_k n_{k,y} / sum_k n_k over S_t.
  The users of round t+1 draw y from the p_hat of round t (uniform before the first round).

`use_generator=False` is the explicit off switch: the user side is the skeleton's plain local
training and the generator is not trained, so a round is FedAvg's round exactly (the official
code's 1e-4 floor on its weights means that zero weights do not switch it off there).
The generator takes `generator_steps` = 50 Adam steps a round by default, as the code does
(`ensemble_epochs // n_teacher_iters` = 10 calls of 5 steps, each on `generator_batch_size` = the
user batch size 32 labels), at lr 3e-4 (the code's MNIST `ensemble_lr`).

Paper vs. official code (zhuangdizhu/FedGen; each a named option, the paper the default):
  * noise: eps ~ N(0, I) ("normal") vs the code's torch.rand U[0, 1) ("uniform").
  * generator_loss: CE of the averaged logits ("ensemble", Eq. 4) vs the code's label-share-
    weighted sum of per-user CE, sum_k mean_i w_{k,y_i} CE(g(z_i; theta_k^p), y_i) with
    w_{k,y} = n_{k,y} / sum_j n_{j,y} ("weighted_ce").
  * label_sampling: y ~ p_hat ("prior") vs the code's uniform draws over the labels ("uniform":
    users over all classes, the server over the labels present in the round's counts).
  * latent_beta: the code's extra "latent" term on users, latent_beta * KL(softmax(g(G(eps, y_b)))
    || h(x_b)) on the real batch's labels (target detached); 0 (off) by default.
  * schedule: "constant" (paper) vs "code": the users' weights are alpha_t = max(1e-4, alpha
    0.98^t) (and latent_beta alike), zero in round 0 (the code regularizes from round 1), and the
    generator's lr decays by 0.98 a round (its ExponentialLR).
  * generator_weight_decay: the code's Adam weight_decay (1e-2, L2 added to the gradient); 0 by
    default. The code's server-side adversarial student term (ensemble_beta) is 0 in all its
    configs and is not implemented.
  * aggregation: the paper averages simply (`Cohort(weighting="uniform")`, our default), the code
    by n_k (`weighting="examples"`).
  * share: "model" (the whole model is averaged, Table 1) or "predictor" (only the head theta^p is
    averaged and broadcast; each client keeps its own feature extractor as a per-client row,
    Table 4; the clients then deploy their own extractor with the global head).
  * label counts: the code counts the labels of the batches a user drew this round, from 1 (a +1
    floor); we upload each client's training-label counts n_{k,y}.
  * the code's generator has a BatchNorm layer (models/generator.py explains why ours has none),
    and the code stops the generated term after `early_stop` = 20 local epochs (it trains 20, so
    it never triggers).
The round is the skeleton's (core/skeleton.py, `ServerRound.step_with_exchange`): FedGen gives it
the users' client, their start rows and a head-only `send` (share="predictor") and takes back the
round's messages for the generator. So `aggregators.dp_mean` gets its round key as in FedAvg; it
is refused with use_generator=True, whose generator is trained on the un-noised heads and sent to
every client, outside the DP guarantee (use_generator=False with dp_mean is DP-FedAvg exactly).
Metrics: local_loss / local_objective are the users' full objective (real + generated terms);
generator_loss (teacher + diversity), generator_teacher_loss and generator_diversity are means
over the round's generator steps, after the users' training.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_lab.algorithms.fedavg import FEDAVG
from fedjax_lab.extend import (Algorithm, Cohort, LocalWork, Model, Optimizer, RowRound,
                               ServerRound, ServerState, Setup, algorithm_config,
                               client_params_of_global, comm, defaults, local_delta, local_train,
                               resolve, row_algorithm, sample_ids, tree_add, tree_sub, validate)
from fedjax_lab.aggregators.privacy import DPMean
from fedjax_lab.models.generator import NOISE_KINDS, Generator, generator as make_generator

GEN_STREAM = 0x6E6   # fold_in constant: the users' generated samples, apart from the model's rng
SERVER_STREAM = 0x6E7  # the generator's training keys, apart from the skeleton's
# Client SGD at lr 0.05 on batches of 32 (20 steps), uniform weights, the `mlp` model: the settings
# of experiments/reproduce/fedgen.py (which reads them from here). With FedAvg's lr 0.01 on batches
# of 10, FedGen's global model stayed below FedAvg's on digits:dirichlet=0.1 (0.836 vs 0.867).
FEDGEN = dataclasses.replace(FEDAVG, cohort=Cohort(weighting="uniform"),
                             work=LocalWork(batch_size=32, local_steps=20),
                             client_opt=Optimizer("sgd", lr=0.05))


@struct.dataclass
class FedGenState:
    server: ServerState      # theta_t, the server optimizer's state, the round counter t
    generator: Any           # w of G_w
    generator_opt: Any       # its Adam state
    label_prior: jax.Array   # [K] p_hat(y) of the last round (uniform before the first)
    latent_dim: int = struct.field(pytree_node=False, default=0)   # the head's input size


NO_HYPERGRAD = {"*": "reverse mode through the generator's training returns NaN (the registry "
                     "check: dL/dalpha NaN against 0.0021 +- 0.0001 by central differences), "
                     "cause not found"}


@defaults(FEDGEN, model="mlp", no_hypergrad=NO_HYPERGRAD)
def fedgen(model: Model, *, generator: Optional[Generator] = None, use_generator: bool = True,
           alpha: float = 1.0, gen_batch_size: int = 32, generator_steps: int = 50,
           generator_lr: float = 3e-4, generator_batch_size: int = 32, eta: float = 1.0,
           noise: str = "normal", generator_loss: str = "ensemble", label_sampling: str = "prior",
           latent_beta: float = 0.0, schedule: str = "constant",
           generator_weight_decay: float = 0.0, share: str = "model",
           setup: Setup = Setup()) -> Algorithm:
    """FedGen (module docstring). generator: a models.generator.Generator whose latent_dim is the
    head's input size (None: generator(latent_dim=that size, num_classes=data.num_classes));
    alpha: weight of the users' generated-sample term, B_G = gen_batch_size samples a step;
    generator_steps Adam steps of lr generator_lr on generator_batch_size labels a round;
    eta: weight of the diversity term. alpha, eta and latent_beta may be traced."""
    if getattr(model, "features", None) is None or getattr(model, "head", None) is None:
        raise ValueError(f"model must have a features / head split (apply == head o features), "
                         f"got model {getattr(model, 'name', model)!r} with features="
                         f"{getattr(model, 'features', None)!r}, head={getattr(model, 'head', None)!r}"
                         "; expected e.g. models.mlp(...) or models.logistic(...)")
    if generator is not None and not isinstance(generator, Generator):
        raise ValueError(f"generator must be a fedjax_lab.models.generator.Generator (or None), "
                         f"got {type(generator).__name__}")
    validate.one_of("use_generator", use_generator, {True, False})
    validate.non_negative("alpha", alpha)
    validate.non_negative("eta", eta)
    validate.non_negative("latent_beta", latent_beta)
    validate.non_negative("generator_weight_decay", generator_weight_decay)
    validate.positive("generator_lr", generator_lr)
    for name, v in (("gen_batch_size", gen_batch_size), ("generator_steps", generator_steps),
                    ("generator_batch_size", generator_batch_size)):
        validate.positive(name, v, integer=True)
    validate.one_of("noise", noise, set(NOISE_KINDS))
    validate.one_of("generator_loss", generator_loss, {"ensemble", "weighted_ce"})
    validate.one_of("label_sampling", label_sampling, {"prior", "uniform"})
    validate.one_of("schedule", schedule, {"constant", "code"})
    validate.one_of("share", share, {"model", "predictor"})
    s = resolve(setup, fedgen, drop_stragglers=True)
    if s.work.client_chunk is not None:
        raise ValueError(f"client_chunk must be None for fedgen (its generator is trained on every "
                         f"sampled client's head), got client_chunk={s.work.client_chunk}")
    if use_generator and isinstance(s.aggregator, DPMean):
        raise ValueError("use_generator=True trains the generator on every sampled client's "
                         "un-noised head and sends it to all clients, outside aggregator "
                         "'dp_mean''s guarantee; use use_generator=False (FedAvg's round, private) "
                         "or another aggregator")
    if share == "predictor" and (s.uplink.name != "identity" or s.attack.attack != "none"):
        raise ValueError(f"share='predictor' sends the head only; it takes uplink 'identity' and no "
                         f"attack, got uplink {s.uplink.name!r}, attack {s.attack.attack!r}")
    rnd = ServerRound(model, s)
    client_tx = s.client_opt.build("client_optimizer")
    decay = optax.exponential_decay(generator_lr, generator_steps, 0.98, staircase=True) \
        if schedule == "code" else generator_lr
    gen_tx = optax.chain(optax.add_decayed_weights(generator_weight_decay),
                         optax.adam(decay, b1=0.9, b2=0.999, eps=1e-8))

    def gen_of(data) -> Generator:
        if generator is not None:
            return generator
        return make_generator(feature_size(model, data), data.num_classes)

    def check(data):
        rnd.check(data)
        d = feature_size(model, data)
        G = gen_of(data)
        if G.latent_dim != d:
            raise ValueError(f"generator: latent_dim={G.latent_dim} does not match the head's input "
                             f"size {d} (the features of model {model.name!r}); expected "
                             f"models.generator.generator(latent_dim={d}, ...)")
        if G.num_classes != data.num_classes:
            raise ValueError(f"generator: num_classes={G.num_classes} does not match the data's "
                             f"{data.num_classes} classes")

    def init_state(key, data):
        check(data)
        w = rnd.init(key, data)                 # theta_0 as FedAvg draws it from the same key
        gparams = gen_of(data).init(jax.random.fold_in(key, SERVER_STREAM))
        K = data.num_classes
        return FedGenState(server=w, generator=gparams, generator_opt=gen_tx.init(gparams),
                           label_prior=jnp.full((K,), 1.0 / K, jnp.float32),
                           latent_dim=feature_size(model, data))

    def user_weight(weight, t):
        if schedule == "constant":
            return weight
        return jnp.where(t == 0, 0.0, jnp.maximum(1e-4, weight * 0.98 ** t.astype(jnp.float32)))

    user_probs = (lambda prior: prior) if label_sampling == "prior" else jnp.ones_like
    with_latent = not (isinstance(latent_beta, (int, float)) and latent_beta == 0)

    def client_fn(state: FedGenState, G: Generator):
        """The user's local training on Eq. 5, as the skeleton's client signature."""
        if not use_generator:
            return local_delta(model, client_tx)
        t = state.server.round
        a_t, b_t = user_weight(alpha, t), user_weight(latent_beta, t)
        gparams, probs = state.generator, user_probs(state.label_prior)

        def loss_fn(params, xb, yb, rng):
            logits = model.apply(params, xb, train=True, rng=rng)
            total = jnp.mean(model.loss(logits, yb))
            B = yb.shape[0] if with_latent else 0
            y_g, eps = draw(jax.random.fold_in(rng, GEN_STREAM), probs, gen_batch_size + B,
                            G.noise_dim, noise)
            y_g, eps, eps_b = y_g[:gen_batch_size], eps[:gen_batch_size], eps[gen_batch_size:]
            z = G.apply(gparams, eps, y_g)
            total = total + a_t * jnp.mean(model.loss(model.head(params, z), y_g))
            if with_latent:
                target = jax.lax.stop_gradient(jax.nn.softmax(model.head(params, G.apply(
                    gparams, eps_b, yb))))
                kl = jnp.sum(jax.scipy.special.xlogy(target, target)
                             - target * jax.nn.log_softmax(logits)) / B
                total = total + b_t * kl
            return total

        train = local_train(model, client_tx, loss_fn=loss_fn)

        def client(w_t, x, y, idx, step_mask, key):
            res = train(w_t, x, y, idx, step_mask, key)
            return tree_sub(res.params, w_t), res.loss, res.objective
        return client

    def train_generator(state: FedGenState, G, heads, present, counts, key):
        """generator_steps Adam steps on Eq. 4 + eta * diversity; heads: the clients' params [C, ...]."""
        n_y = jnp.sum(counts * present[:, None], 0)                          # [K]
        prior = n_y / jnp.maximum(jnp.sum(n_y), 1.0)
        share_y = counts * present[:, None] / jnp.where(n_y > 0, n_y, 1.0)   # w_{k,y}
        probs = prior if label_sampling == "prior" else (n_y > 0).astype(jnp.float32)

        def step(carry, i):
            gparams, opt_state = carry
            y, eps = draw(jax.random.fold_in(key, i), probs, generator_batch_size, G.noise_dim, noise)
            (loss, parts), g = jax.value_and_grad(generator_objective, argnums=1, has_aux=True)(
                G, gparams, model, heads, present, share_y, y, eps, eta=eta, loss=generator_loss)
            updates, opt_state = gen_tx.update(g, opt_state, gparams)
            return (optax.apply_updates(gparams, updates), opt_state), (loss,) + parts

        (gparams, opt_state), (loss, teacher, diversity) = jax.lax.scan(
            step, (state.generator, state.generator_opt), jnp.arange(generator_steps))
        metrics = dict(generator_loss=jnp.mean(loss), generator_teacher_loss=jnp.mean(teacher),
                       generator_diversity=jnp.mean(diversity))
        return gparams, opt_state, prior, metrics

    def step(state: FedGenState, data, part, *, k_train, key, w_start=None, head_only=None):
        """One round for participation `part`: the skeleton's exchange and server step with the
        users of Eq. 5 (from theta_t, or each from its row of w_start [C, ...] with the global
        head, sending the `head_only` leaves), then the generator's training on their heads.
        Returns (state, the clients' trained models [C, ...] (None from theta_t), metrics)."""
        G = gen_of(data)
        w_t = state.server.params
        batched = head_only is not None
        K = data.num_classes
        head_bytes = lambda w: sum(comm.dense_bytes(x) for h, x in zip(
            jax.tree.leaves(head_only), jax.tree.leaves(w)) if h)
        up_extra = 4 * K if use_generator else 0                      # the label counts
        down_extra = comm.dense_bytes(state.generator) + 4 * K if use_generator else 0  # G_w, p_hat
        r = dataclasses.replace(
            rnd, client=client_fn(state, G),
            send=(lambda msgs: jax.tree.map(lambda h, m: m if h else jnp.zeros_like(m), head_only,
                                            msgs)) if batched else None,
            up_bytes=lambda w, d: (head_bytes(w) if batched else
                                   s.uplink.bytes(w, comm.dense_bytes(w))) + up_extra,
            down_bytes=lambda w, d: (head_bytes(w) if batched else comm.dense_bytes(w)) + down_extra)
        server, metrics, ex = r.step_with_exchange(state.server, data, part, k_train=k_train,
                                                   key=key, w_start=w_start)
        trained = tree_add(w_start, ex.messages) if batched else None
        if use_generator:
            heads = trained if batched else jax.tree.map(lambda a, m: a + m, w_t, ex.sent)
            gparams, gopt, prior, gmetrics = train_generator(
                state, G, heads, (ex.weights > 0).astype(jnp.float32), label_counts(data, part.ids),
                jax.random.fold_in(key, SERVER_STREAM))
            state = state.replace(generator=gparams, generator_opt=gopt, label_prior=prior)
            metrics.update(gmetrics)
        return state.replace(server=server), trained, metrics

    derived = None if generator is None else dict(generator=(
        f"generator(latent_dim={generator.latent_dim}, noise_dim={generator.noise_dim}, "
        f"hidden={generator.hidden})"))
    config = algorithm_config("fedgen", model, s, derived=derived)

    if share == "model":
        def round_(state, data, key):
            k_part, k_train = jax.random.split(key)      # as the skeleton's round splits it
            part = rnd.participate(k_part, data)
            new, _, metrics = step(state, s.attack.poison(data), part, k_train=k_train, key=key)
            return new, metrics

        global_params = lambda st: st.server.params
        return Algorithm(name="fedgen", init=init_state, round=round_, model=model,
                         client_params=client_params_of_global(global_params),
                         global_params=global_params, check=check, config=config, setup=s)

    def merge(mask, rows, w):
        """Each row's extractor with the global head w's leaves."""
        return jax.tree.map(lambda h, r, g: jnp.broadcast_to(g, r.shape) if h else r, mask, rows, w)

    def row_step(state, rows, ids, data, key):
        part, rows, data, (k_train,) = rnd.begin_rows(key, data, ids, rows)
        mask = head_leaves(model, state.server.params, state.latent_dim)
        w_start = merge(mask, rows, state.server.params)
        new, trained, metrics = step(state, data, part, k_train=k_train, key=key,
                                     w_start=w_start, head_only=mask)
        return new, rnd.end_rows(trained, ids), metrics

    def personal(server, rows):
        w = server.server.params
        return merge(head_leaves(model, w, server.latent_dim), rows, w)

    spec = RowRound(init_server=init_state, init_row=lambda st: st.server.params,
                    sample=lambda data, key: sample_ids(jax.random.split(key)[0], data, s.cohort),
                    step=row_step, params=personal)
    alg = row_algorithm(spec, name="fedgen", model=model, check=check, config=config)
    return dataclasses.replace(alg, setup=s)


def generator_objective(G: Generator, gparams, model: Model, heads, present, share_y, y, eps, *,
                        eta, loss: str = "ensemble"):
    """The generator's loss on labels y [B] and noises eps [B, d] (module docstring):

        ensemble:     mean_i CE(sum_k m_k g(z_i; theta_k) / sum_k m_k, y_i)     z_i = G_w(eps_i, y_i)
        weighted_ce:  sum_k mean_i w_{k,y_i} CE(g(z_i; theta_k), y_i)
        + eta * exp(-mean_{i,j} mean_d (eps_i - eps_j)^2 * mean_d |z_i - z_j|)

    heads: the clients' params stacked [C, ...] (vmapped), present: m_k [C] (1 for the aggregated
    clients), share_y: w_{k,y} [C, K]. Returns (loss, (teacher loss, diversity term))."""
    z = G.apply(gparams, eps, y)
    logits = jax.vmap(lambda th: model.head(th, z))(heads)                     # [C, B, K]
    if loss == "ensemble":
        mean_logits = jnp.tensordot(present, logits, 1) / jnp.maximum(jnp.sum(present), 1.0)
        teacher = jnp.mean(model.loss(mean_logits, y))
    else:
        ce = jax.vmap(lambda l: model.loss(l, y))(logits)                      # [C, B]
        teacher = jnp.sum(jnp.mean(share_y[:, y] * ce, axis=1))
    noise_dist = jnp.mean((eps[:, None, :] - eps[None, :, :]) ** 2, -1)
    layer_dist = jnp.mean(jnp.abs(z[:, None, :] - z[None, :, :]), -1)
    diversity = jnp.exp(-jnp.mean(noise_dist * layer_dist))
    return teacher + eta * diversity, (teacher, diversity)


def draw(key, probs, n: int, noise_dim: int, noise: str):
    """(y [n], eps [n, noise_dim]) from one uniform draw u [n, 1 + noise_dim] in [0, 1): y_i is
    u_i0 read through the inverse CDF of `probs` (y_i = #{c < K - 1: CDF(c) <= u_i0}; classes of
    probability 0 are never drawn), eps_i = u_i,1: ("uniform", the code's U[0, 1)) or
    Phi^-1(u_i,1:) clipped to [1e-7, 1 - 1e-7] ("normal", N(0, I)). One random call a step: each
    threefry draw inside the vmapped local scan costs compile time."""
    u = jax.random.uniform(key, (n, 1 + noise_dim))
    cdf = jnp.cumsum(probs) / jnp.sum(probs)
    last = probs.shape[0] - 1 - jnp.argmax(probs[::-1] > 0)        # the last class drawable
    y = jnp.minimum(jnp.sum(u[:, :1] >= cdf[None, :-1], axis=1), last).astype(jnp.int32)
    eps = u[:, 1:]
    if noise == "normal":
        eps = jax.scipy.special.ndtri(jnp.clip(eps, 1e-7, 1.0 - 1e-7))
    return y, eps


def label_counts(data, ids):
    """[C, K] training-label counts n_{k,y} of clients `ids` (what they upload)."""
    owner = data.client_ids()
    counts = jax.ops.segment_sum(jax.nn.one_hot(data.y, data.num_classes), owner,
                                 num_segments=data.num_clients)
    return jnp.take(counts, ids, axis=0, mode="clip")


def feature_size(model: Model, data) -> int:
    """Size of the representation the head takes, from the shapes only (nothing is computed)."""
    params = jax.eval_shape(model.init, jax.random.key(0), data.x[:1])
    z = jax.eval_shape(lambda p, x: model.features(p, x), params, data.x[:1])
    return int(z.shape[-1])


def head_leaves(model: Model, params, latent_dim: int):
    """A pytree of bools like `params`: True for the leaves the head reads (theta^p), found from
    the jaxpr of head(params, z); the rest is the feature extractor theta^f."""
    leaves, treedef = jax.tree.flatten(params)
    jaxpr = jax.make_jaxpr(lambda ls: model.head(jax.tree.unflatten(treedef, ls),
                                                 jnp.zeros((1, latent_dim))))(leaves).jaxpr
    used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    return jax.tree.unflatten(treedef, [id(v) in used for v in jaxpr.invars])
