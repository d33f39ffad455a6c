"""FedGen (Zhu, Hong, Zhou, "Data-Free Knowledge Distillation for Heterogeneous Federated
Learning", ICML 2021, Algorithm 1, Eq. 4-5).

The model splits as h(x; theta) = g(f(x; theta^f); theta^p) (apply = head o features); the server
keeps a generator G_w(eps, y) -> z in feature space (models/generator.py) and the label prior
p_hat(y) from the clients' label counts n_{k,y}. Round t, sampled clients S_t:

  users (vmapped over S_t), from theta_t, on B real and B_G generated examples a step:
      min_theta  L_k(theta) + alpha E_{y~p_hat, eps} CE(g(G_w(eps, y); theta^p), y)          (Eq. 5)
  server: theta_{t+1} = the skeleton's aggregate of the theta_k (any aggregator, uplink, attack,
      server optimizer), then `generator_steps` Adam steps on
      min_w E_{y~p_hat} E_eps CE(softmax((1/|S_t|) sum_k g(G_w(eps, y); theta_k^p)), y)    (Eq. 4)
             + eta * exp(-mean_{i,j} ||eps_i - eps_j||^2_mean * |G(eps_i) - G(eps_j)|_mean)
      (Mao et al. 2019's diversity term as the code writes it), the teacher being the ensemble of
      the uploaded heads theta_k^p, p_hat(y) = sum_k n_{k,y} / sum_k n_k over S_t; the users of
      round t+1 draw y from it (uniform before the first round).

use_generator=False switches FedGen off: a round is then FedAvg's exactly. Defaults as the code's
MNIST run: 50 generator steps a round (10 calls of 5) on generator_batch_size = 32 labels each,
Adam lr 3e-4; B_G = gen_batch_size = 32 generated samples in each user step.

Paper vs. official code (zhuangdizhu/FedGen; each a named option, the paper the default):
  * noise: eps ~ N(0, I) ("normal") vs the code's torch.rand U[0, 1) ("uniform").
  * generator_loss: CE of the averaged logits ("ensemble", Eq. 4) vs the code's label-share-
    weighted sum_k mean_i w_{k,y_i} CE(g(z_i; theta_k^p), y_i), w_{k,y} = n_{k,y} / sum_j n_{j,y}
    ("weighted_ce").
  * label_sampling: y ~ p_hat ("prior") vs uniform over the labels ("uniform": users over all
    classes, the server over those in the round's counts).
  * latent_beta: the code's latent term on users, latent_beta KL(softmax(g(G(eps, y_b))) || h(x_b))
    on the real batch's labels (target detached); 0 (off) by default.
  * schedule: "constant" (paper) vs "code": alpha_t = max(1e-4, alpha 0.98^t) (latent_beta alike)
    but 0 in round 0, and the generator's lr x 0.98 a round. (With "code", alpha = 0 is not off.)
  * generator_weight_decay: the code's Adam weight_decay (1e-2); 0 by default. Its server-side
    adversarial term (ensemble_beta) is 0 in all its configs and is not implemented.
  * aggregation: the paper averages simply (Cohort(weighting="uniform"), our default), the code
    by n_k (weighting="examples").
  * share: "model" (all of theta is averaged, Table 1) or "predictor" (only theta^p is averaged
    and broadcast; each client keeps its extractor as a per-client row and deploys it with the
    global head, Table 4).
  * label counts: the code counts the labels of the batches drawn this round, from 1; we upload
    each client's training-label counts. Its generator's BatchNorm (models/generator.py) and its
    early_stop (20 local epochs, never reached) are left out.
The round is the skeleton's (ServerRound.begin_rows, step_with_exchange, end_rows), the users its
client; the messages then train G. dp_mean is refused with the generator on (G learns from the
un-noised heads and goes to every client). Metrics: local_loss / local_objective are the users'
Eq. 5; generator_loss (teacher + eta diversity), generator_teacher_loss, generator_diversity are
means over the round's generator steps.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_lab.algorithms.fedavg import FEDAVG
from fedjax_lab.extend import (Algorithm, Cohort, LocalWork, Model, Optimizer, RowRound,
                               ServerRound, ServerState, Setup, client_params_of_global, comm,
                               defaults, local_delta, local_train, resolve, row_algorithm,
                               tree_add, tree_sub, validate)
from fedjax_lab.aggregators.privacy import DPMean
from fedjax_lab.models.generator import NOISE_KINDS, Generator, generator as make_generator
from fedjax_lab.models.hypernet import head_mask

GEN_STREAM = 0x6E6     # fold_in constant: the users' generated samples, apart from the model's rng
SERVER_STREAM = 0x6E7  # the generator's init and training keys, apart from the skeleton's
# experiments/reproduce/fedgen.py's settings (it reads them here): with FedAvg's lr 0.01 on batches
# of 10, FedGen's global model stayed below FedAvg's on digits:dirichlet=0.1 (0.836 vs 0.867).
FEDGEN = dataclasses.replace(FEDAVG, cohort=Cohort(weighting="uniform"),
                             work=LocalWork(batch_size=32, local_steps=20),
                             client_opt=Optimizer("sgd", lr=0.05))
NO_HYPERGRAD = {"*": "reverse mode through the generator's training returns NaN (the registry "
                     "check: dL/dalpha NaN against 0.0021 +- 0.0001 by central differences), "
                     "cause not found"}


@struct.dataclass
class FedGenState:
    server: ServerState      # theta_t, the server optimizer's state, the round counter t
    generator: Any           # w of G_w
    generator_opt: Any       # its Adam state
    label_prior: jax.Array   # [K] p_hat(y) of the last round (uniform before the first)
    latent_dim: int = struct.field(pytree_node=False, default=0)   # the head's input size


class HParams(NamedTuple):
    """fedgen's keywords but model and setup (alpha, eta, latent_beta may be traced)."""
    generator: Optional[Generator]
    use_generator: bool
    alpha: Any
    gen_batch_size: int          # B_G: generated samples in each user step (Eq. 5)
    generator_steps: int
    generator_lr: float
    generator_batch_size: int    # labels in each generator step (Eq. 4)
    eta: Any
    noise: str
    generator_loss: str
    label_sampling: str
    latent_beta: Any
    schedule: str
    generator_weight_decay: float
    share: str


@defaults(FEDGEN, model="mlp", no_hypergrad=NO_HYPERGRAD)
def fedgen(model: Model, *, generator: Optional[Generator] = None, use_generator: bool = True,
           alpha: float = 1.0, gen_batch_size: int = 32, generator_steps: int = 50,
           generator_lr: float = 3e-4, generator_batch_size: int = 32, eta: float = 1.0,
           noise: str = "normal", generator_loss: str = "ensemble", label_sampling: str = "prior",
           latent_beta: float = 0.0, schedule: str = "constant",
           generator_weight_decay: float = 0.0, share: str = "model",
           setup: Setup = Setup()) -> Algorithm:
    """FedGen (module docstring). Users: weight alpha on B_G = gen_batch_size generated samples a
    local step (Eq. 5). Server: generator_steps Adam steps of lr generator_lr a round, each on
    generator_batch_size drawn labels (Eq. 4), eta the weight of the diversity term. generator: a
    models.generator.Generator with latent_dim = the head's input size (None: generator(that
    size, data.num_classes))."""
    if getattr(model, "features", None) is None or getattr(model, "head", None) is None:
        raise ValueError(f"model must have a features / head split (apply == head o features), "
                         f"got model {getattr(model, 'name', model)!r}; expected e.g. models.mlp()")
    if generator is not None and not isinstance(generator, Generator):
        raise ValueError(f"generator must be a fedjax_lab.models.generator.Generator (or None), "
                         f"got {type(generator).__name__}")
    validate.one_of("use_generator", use_generator, {True, False})
    for name, v in (("alpha", alpha), ("eta", eta), ("latent_beta", latent_beta),
                    ("generator_weight_decay", generator_weight_decay)):
        validate.non_negative(name, v)
    validate.positive("generator_lr", generator_lr)
    for name, v in (("gen_batch_size", gen_batch_size), ("generator_steps", generator_steps),
                    ("generator_batch_size", generator_batch_size)):
        validate.positive(name, v, integer=True)
    for name, v, kinds in (("noise", noise, set(NOISE_KINDS)),
                           ("generator_loss", generator_loss, {"ensemble", "weighted_ce"}),
                           ("label_sampling", label_sampling, {"prior", "uniform"}),
                           ("schedule", schedule, {"constant", "code"}),
                           ("share", share, {"model", "predictor"})):
        validate.one_of(name, v, kinds)
    s = resolve(setup, fedgen, drop_stragglers=True)
    if s.work.client_chunk is not None:
        raise ValueError(f"client_chunk must be None for fedgen (its generator is trained on every "
                         f"sampled client's head), got client_chunk={s.work.client_chunk}")
    if use_generator and isinstance(s.aggregator, DPMean):
        raise ValueError("use_generator=True trains the generator on every sampled client's "
                         "un-noised head and sends it to all clients, outside dp_mean's guarantee; "
                         "use use_generator=False (DP-FedAvg) or another aggregator")
    if share == "predictor" and (s.uplink.name != "identity" or s.attack.attack != "none"):
        raise ValueError(f"share='predictor' sends the head only; it takes uplink 'identity' and no "
                         f"attack, got uplink {s.uplink.name!r}, attack {s.attack.attack!r}")
    hp = HParams(generator, use_generator, alpha, gen_batch_size, generator_steps, generator_lr,
                 generator_batch_size, eta, noise, generator_loss, label_sampling, latent_beta,
                 schedule, generator_weight_decay, share)
    config = {} if generator is None else dict(derived=dict(generator=(
        f"generator(latent_dim={generator.latent_dim}, noise_dim={generator.noise_dim}, "
        f"hidden={generator.hidden})")))
    return assemble(hp, ServerRound(model, s), config)


def assemble(hp: HParams, rnd: ServerRound, config: dict) -> Algorithm:
    """The Algorithm: one round function for both shares; "predictor" runs it over per-client
    rows (state ClientRows(FedGenState, rows)), "model" without (state FedGenState; the round
    returns (state, metrics) of its (state, None, metrics))."""
    init, check = functools.partial(init_state, hp, rnd), functools.partial(check_data, hp, rnd)
    step = functools.partial(fedgen_round, hp, rnd)        # (state, rows, ids, data, key)
    if hp.share == "model":
        glob = lambda st: st.server.params
        return Algorithm(init=init, model=rnd.model,
                         round=lambda st, data, key: step(st, None, None, data, key)[::2],
                         client_params=client_params_of_global(glob), global_params=glob,
                         check=check, config=config, setup=rnd.setup)
    personal = lambda st, rows: merge_head(head_leaves(rnd.model, st.server.params, st.latent_dim),
                                           rows, st.server.params)
    spec = RowRound(init_server=init, init_row=lambda st: st.server.params, sample=rnd.sample,
                    step=step, params=personal)
    alg = row_algorithm(spec, model=rnd.model, check=check, config=config)
    return dataclasses.replace(alg, setup=rnd.setup)


def generator_of(hp: HParams, model: Model, data) -> Generator:
    """G: the generator given, or generator(latent_dim = the head's input size, K classes)."""
    if hp.generator is not None:
        return hp.generator
    return make_generator(feature_size(model, data), data.num_classes)


def generator_optimizer(hp: HParams):
    """Adam (+ the code's weight decay); "code" schedule: lr x 0.98 a round (its ExponentialLR)."""
    lr = (optax.exponential_decay(hp.generator_lr, hp.generator_steps, 0.98, staircase=True)
          if hp.schedule == "code" else hp.generator_lr)
    return optax.chain(optax.add_decayed_weights(hp.generator_weight_decay),
                       optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8))


def check_data(hp: HParams, rnd: ServerRound, data):
    """The skeleton's check of the data, and G's sizes against the model's and the data's."""
    rnd.check(data)
    d, G = feature_size(rnd.model, data), generator_of(hp, rnd.model, data)
    if G.latent_dim != d:
        raise ValueError(f"generator: latent_dim={G.latent_dim} does not match the head's input "
                         f"size {d} (the features of model {rnd.model.name!r}); expected "
                         f"models.generator.generator(latent_dim={d}, ...)")
    if G.num_classes != data.num_classes:
        raise ValueError(f"generator: num_classes={G.num_classes} does not match the data's "
                         f"{data.num_classes} classes")


def init_state(hp: HParams, rnd: ServerRound, key, data) -> FedGenState:
    """theta_0 as FedAvg draws it from `key`, w_0 from fold_in(key, SERVER_STREAM), uniform p_hat."""
    check_data(hp, rnd, data)
    w = rnd.init(key, data)
    gparams = generator_of(hp, rnd.model, data).init(jax.random.fold_in(key, SERVER_STREAM))
    K = data.num_classes
    return FedGenState(server=w, generator=gparams,
                       generator_opt=generator_optimizer(hp).init(gparams),
                       label_prior=jnp.full((K,), 1.0 / K, jnp.float32),
                       latent_dim=feature_size(rnd.model, data))


def fedgen_round(hp: HParams, rnd: ServerRound, state: FedGenState, rows, ids, data, key):
    """Algorithm 1's round: the users of Eq. 5 in the skeleton's exchange and server step, then G
    trained on their heads (Eq. 4). share="predictor": over the sampled clients' rows [C, ...],
    each user from its own extractor with the global head, sending the head only; share="model":
    rows = ids = None, every user from theta_t. Returns (state, new rows or None, metrics)."""
    model, s = rnd.model, rnd.setup
    part, rows, data, (k_train,) = rnd.begin_rows(key, data, ids, rows)
    w_t, K, G = state.server.params, data.num_classes, generator_of(hp, model, data)
    head_only = None if rows is None else head_leaves(model, w_t, state.latent_dim)
    w_start = None if rows is None else merge_head(head_only, rows, w_t)
    head_bytes = lambda w: sum(comm.dense_bytes(x) for h, x in zip(
        jax.tree.leaves(head_only), jax.tree.leaves(w)) if h)
    up_extra = 4 * K if hp.use_generator else 0                                 # n_{k,y}
    down_extra = comm.dense_bytes(state.generator) + 4 * K if hp.use_generator else 0  # w, p_hat
    r = dataclasses.replace(
        rnd, client=user_client(hp, model, s.client_opt.build("client_optimizer"), state, G),
        send=None if rows is None else (lambda msgs: jax.tree.map(
            lambda h, m: m if h else jnp.zeros_like(m), head_only, msgs)),
        up_bytes=lambda w, d: (s.uplink.bytes(w, comm.dense_bytes(w)) if rows is None
                               else head_bytes(w)) + up_extra,
        down_bytes=lambda w, d: (comm.dense_bytes(w) if rows is None else head_bytes(w))
        + down_extra)
    server, metrics, ex = r.step_with_exchange(state.server, data, part, k_train=k_train, key=key,
                                               w_start=w_start)
    trained = None if rows is None else tree_add(w_start, ex.messages)
    if hp.use_generator:
        heads = jax.tree.map(lambda a, m: a + m, w_t, ex.sent) if rows is None else trained
        gparams, gopt, prior, gmetrics = train_generator(
            hp, model, G, state, heads, (ex.weights > 0).astype(jnp.float32),
            label_counts(data, part.ids), jax.random.fold_in(key, SERVER_STREAM))
        state = state.replace(generator=gparams, generator_opt=gopt, label_prior=prior)
        metrics.update(gmetrics)
    return state.replace(server=server), rnd.end_rows(trained, ids), metrics


def scheduled(hp: HParams, weight, t):
    """The users' weight in round t: `weight`, or the code's max(1e-4, weight 0.98^t), 0 at t=0."""
    if hp.schedule == "constant":
        return weight
    return jnp.where(t == 0, 0.0, jnp.maximum(1e-4, weight * 0.98 ** t.astype(jnp.float32)))


def user_objective(hp: HParams, model: Model, G: Generator, gparams, probs, a_t, b_t, params, xb,
                   yb, rng):
    """Eq. 5 on a local step's batch (x_b, y_b) [B], with (y_i, eps_i) = draw(p, B_G) from the
    step's rng (p = p_hat, or uniform):

        mean_b CE(h(x_b; theta), y_b) + alpha_t mean_i CE(g(G_w(eps_i, y_i); theta^p), y_i)
            [+ beta_t KL(softmax(g(G_w(eps_b, y_b); theta^p)) || h(x_b; theta))]   (latent_beta)
    """
    logits = model.apply(params, xb, train=True, rng=rng)
    total = jnp.mean(model.loss(logits, yb))
    with_latent = not (isinstance(hp.latent_beta, (int, float)) and hp.latent_beta == 0)
    B, B_G = (yb.shape[0] if with_latent else 0), hp.gen_batch_size
    y_g, eps = draw(jax.random.fold_in(rng, GEN_STREAM), probs, B_G + B, G.noise_dim, hp.noise)
    y_g, eps, eps_b = y_g[:B_G], eps[:B_G], eps[B_G:]
    z = G.apply(gparams, eps, y_g)
    total = total + a_t * jnp.mean(model.loss(model.head(params, z), y_g))
    if with_latent:
        target = jax.lax.stop_gradient(jax.nn.softmax(model.head(params, G.apply(
            gparams, eps_b, yb))))
        kl = jnp.sum(jax.scipy.special.xlogy(target, target)
                     - target * jax.nn.log_softmax(logits)) / B
        total = total + b_t * kl
    return total


def user_client(hp: HParams, model: Model, client_tx, state: FedGenState, G: Generator):
    """The users' local training on Eq. 5 (user_objective) from w_t, as the skeleton's client
    (w_t, x, y, idx, step_mask, key) -> (w_k - w_t, loss, objective); plain training when off."""
    if not hp.use_generator:
        return local_delta(model, client_tx)
    t = state.server.round
    a_t, b_t = scheduled(hp, hp.alpha, t), scheduled(hp, hp.latent_beta, t)
    probs = state.label_prior if hp.label_sampling == "prior" else jnp.ones_like(state.label_prior)
    train = local_train(model, client_tx, loss_fn=functools.partial(
        user_objective, hp, model, G, state.generator, probs, a_t, b_t))

    def client(w_t, x, y, idx, step_mask, key):
        res = train(w_t, x, y, idx, step_mask, key)
        return tree_sub(res.params, w_t), res.loss, res.objective
    return client


def train_generator(hp: HParams, model: Model, G: Generator, state: FedGenState, heads, present,
                    counts, key):
    """generator_steps Adam steps on Eq. 4 (generator_objective) from the state's G and its Adam
    state; heads: the clients' params [C, ...], present: m_k [C], counts: n_{k,y} [C, K].
    Returns (w, Adam state, p_hat, metrics)."""
    n_y = jnp.sum(counts * present[:, None], 0)                          # [K]
    prior = n_y / jnp.maximum(jnp.sum(n_y), 1.0)
    share_y = counts * present[:, None] / jnp.where(n_y > 0, n_y, 1.0)   # w_{k,y}
    probs = prior if hp.label_sampling == "prior" else (n_y > 0).astype(jnp.float32)
    tx = generator_optimizer(hp)

    def step(carry, i):
        gparams, opt_state = carry
        y, eps = draw(jax.random.fold_in(key, i), probs, hp.generator_batch_size, G.noise_dim,
                      hp.noise)
        (loss, parts), g = jax.value_and_grad(generator_objective, argnums=1, has_aux=True)(
            G, gparams, model, heads, present, share_y, y, eps, eta=hp.eta, loss=hp.generator_loss)
        updates, opt_state = tx.update(g, opt_state, gparams)
        return (optax.apply_updates(gparams, updates), opt_state), (loss,) + parts

    (gparams, opt_state), (loss, teacher, diversity) = jax.lax.scan(
        step, (state.generator, state.generator_opt), jnp.arange(hp.generator_steps))
    return gparams, opt_state, prior, dict(
        generator_loss=jnp.mean(loss), generator_teacher_loss=jnp.mean(teacher),
        generator_diversity=jnp.mean(diversity))


def generator_objective(G: Generator, gparams, model: Model, heads, present, share_y, y, eps, *,
                        eta, loss: str = "ensemble"):
    """The generator's loss on labels y [B] and noises eps [B, d] (Eq. 4 + diversity):

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
    return jnp.take(data.label_counts(), ids, axis=0, mode="clip")


def feature_size(model: Model, data) -> int:
    """Size of the representation the head takes, from the shapes only (nothing is computed)."""
    params = jax.eval_shape(model.init, jax.random.key(0), data.x[:1])
    return int(jax.eval_shape(model.features, params, data.x[:1]).shape[-1])


def head_leaves(model: Model, params, latent_dim: int):
    """A pytree of bools like `params`: True for the leaves theta^p the head reads on features of
    size latent_dim (models.hypernet.head_mask); the rest is the feature extractor theta^f."""
    return head_mask(model, params, jax.ShapeDtypeStruct((1, latent_dim), jnp.float32))


def merge_head(mask, rows, w):
    """Each row [C, ...] with the leaves of w that `mask` marks (the global head)."""
    return jax.tree.map(lambda h, r, g: jnp.broadcast_to(g, r.shape) if h else r, mask, rows, w)
