"""FedMeta (Chen, Luo, Dong, Li, He, "Federated Meta-Learning with Fast Convergence and Efficient
Communication", arXiv:1802.07876): the server shares a meta-learner, not a model.

Round t, sampled clients U_t; client u holds a support set S_u and a query set Q_u (core/meta.py:
a fixed split of its train split, `support_fraction`, `split_seed`). With L_D the mean loss on D:

    theta'_u = theta - alpha * grad L_S(theta)            inner_steps times (plain GD, full S_u)
    g_u      = grad_(theta) L_Q(theta'_u)                 the meta-gradient, sent up
    theta   <- ServerOpt(theta, sum_u p_u g_u / sum_u p_u)     Adam by default

  * MAML ("fedmeta_maml"): g_u differentiates through the inner loop, second order:
    for one step g_u = (I - alpha H_S(theta)) grad L_Q(theta'_u).
  * FOMAML ("fedmeta_fomaml"): stop_gradient on the inner gradients, so d theta'/d theta = I and
    g_u = grad L_Q(theta'_u) (the gradient at theta', applied to theta).
  * Meta-SGD ("fedmeta_metasgd"): alpha is a learned pytree of theta's shape (initially `inner_lr`
    everywhere), theta'_u = theta - alpha (.) grad L_S(theta), and (theta, alpha) are trained
    jointly by the outer step: the server state holds both, both go down to the clients (counted
    in bytes_down), and the clients' meta-gradients w.r.t. both come up (bytes_up).

p_u: the cohort's weighting, "examples" (p_u = n_u, the client's train size; default, as FedAvg)
or "uniform". The round is the skeleton of core/skeleton.py with the meta-gradient as a gradient
message, so any aggregator, attack, uplink and server optimizer of the Setup composes.

Data: the round's data is the training clients' FederatedArrays; each sampled client's support and
query rows are cut on the fly by `core.meta.support_query_rows` (the same rule as
`meta.split_support_query`), so the split never has to be stored beside the data. Personalized
evaluation: `alg.adapt(state, support, ids)` takes the inner_steps GD steps (with the learned alpha
for Meta-SGD) on each client's support split (core/meta.adapted_evaluation); `client_params` and
`global_params` are the meta-learned theta itself.

Paper vs. code:
  * The paper trains with Adam; that can only be the *outer* (server) optimizer: the inner loop
    must be the update whose derivative the meta-gradient takes (MAML's and Meta-SGD's theta' is
    one explicit GD step per inner step), so the inner loop is plain GD with step alpha and the
    server optimizer is `Setup.server_opt` (default optax Adam, lr 0.1, b2 0.999, eps 1e-8;
    with alpha = 0.5 and 3 inner steps, the defaults that show the claim on the small offline
    data: `fedjax-lab run fedmeta_maml` and experiments/reproduce/fedmeta.py share them).
  * The paper samples the support and query sets of a client per episode; we fix the split per
    client (core/meta.py) and use the whole support and query sets (full-batch), so a client's
    meta-gradient is deterministic given theta (up to dropout).
  * The weighting of the clients' meta-gradients (n_u or uniform) could not be checked against
    the paper offline; both are offered (Cohort.weighting), n_u is the default.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_lab.extend import (Batches, Cohort, LocalWork, MetaAlgorithm, Model, Optimizer,
                               ServerRound, Setup, check_support_fraction, client_params_of_global,
                               defaults, gd_adapt, gd_steps, init_server, masked_loss, resolve,
                               split_support_query, support_query_rows, validate)

USES = frozenset({"cohort", "server_opt", "aggregator", "attack", "uplink"})
# Server Adam at lr 0.1 with alpha = 0.5 and 3 inner steps: the settings under which FedMeta's claim
# shows at the README's small size (experiments/reproduce/fedmeta.py reads them from here); Adam's
# usual lr 1e-3 leaves the meta-learner below FedAvg after 60 rounds on 2-label digits clients.
FEDMETA = Setup(cohort=Cohort(clients_per_round=10),
                server_opt=Optimizer("adam", lr=0.1, b1=0.9, b2=0.999, eps=1e-8))
# participate() then draws one 1-example batch per client, whose rows are replaced by the split
_NO_WORK = LocalWork(batch_size=1, local_steps=1)
VARIANTS = ("maml", "fomaml", "metasgd")
# FOMAML's stop_gradient is the algorithm, and it lies on every path from a hyperparameter to the
# trained theta (d theta'/d theta = I instead of I - alpha H_S): fl.hypergrad refuses them all.
FOMAML_NO_HYPERGRAD = {"*": "its inner gradients pass through a stop_gradient (first-order "
                            "meta-gradient), which cuts d theta'/d theta on the path from every "
                            "hyperparameter to the trained theta"}


def meta_client(model: Model, *, inner_lr, inner_steps: int, variant: str):
    """client(w, x, y, idx [2, W], step_mask [2], key) -> (g, L_Q(theta'), L_Q(theta')):
    idx[0] the support rows, idx[1] the query rows (-1 = padding); w = theta, or
    {"theta", "alpha"} for Meta-SGD, and g = grad_w L_Q(theta'(w))."""
    def query_loss(w, x, y, support, query, key):
        theta, alpha = (w["theta"], w["alpha"]) if variant == "metasgd" else (w, inner_lr)
        adapted = gd_steps(model, theta, alpha, x, y, support, key, steps=inner_steps,
                           first_order=variant == "fomaml")
        return masked_loss(model, adapted, x, y, query, jax.random.fold_in(key, inner_steps))

    def client(w, x, y, idx, step_mask, key):
        loss, g = jax.value_and_grad(query_loss)(w, x, y, idx[0], idx[1], key)
        return g, loss, loss
    return client


@dataclasses.dataclass(frozen=True, eq=False)
class MetaRound(ServerRound):
    """The skeleton whose participation carries each client's support / query rows as its
    batches (idx [C, 2, W]): the meta-client reads them, everything else is ServerRound's."""
    support_fraction: float = 0.2
    split_seed: int = 0

    def participate(self, key, data, ids=None):
        part = super().participate(key, data, ids=ids)
        support, query = support_query_rows(data, part.ids, self.support_fraction, self.split_seed)
        idx = jnp.stack([support, query], axis=1)
        active = part.batches.num_steps > 0
        return part.replace(batches=Batches(idx, jnp.broadcast_to(active[:, None], idx.shape[:2]),
                                            part.batches.num_steps))

    def check(self, data):
        super().check(data)
        # min_client_size is static: the sizes are read (to name the client) only on failure
        small = data.min_client_size < 2
        check_support_fraction(self.support_fraction,
                               jax.device_get(data.client_sizes) if small else [])


def _fedmeta(model, factory, setup, *, variant, inner_lr, inner_steps, support_fraction,
             split_seed) -> MetaAlgorithm:
    validate.positive("inner_lr", inner_lr)
    validate.positive("inner_steps", inner_steps, integer=True)
    check_support_fraction(support_fraction, [])
    if isinstance(split_seed, bool) or not isinstance(split_seed, int):
        raise ValueError(f"split_seed must be an int, got {split_seed!r}")
    s = resolve(setup, factory)
    name = factory.__name__
    rnd = MetaRound(model, dataclasses.replace(s, work=_NO_WORK),
                    client=meta_client(model, inner_lr=inner_lr, inner_steps=inner_steps,
                                       variant=variant),
                    gradient_message=True, drop_stragglers=False,
                    support_fraction=support_fraction, split_seed=split_seed)
    learn_alpha = variant == "metasgd"
    theta_of = (lambda st: st.params["theta"]) if learn_alpha else (lambda st: st.params)

    def init(key, data):
        rnd.check(data)
        theta = model.init(key, data.x[:1])
        if not learn_alpha:
            return init_server(rnd.server_tx, theta)
        alpha = jax.tree.map(lambda p: jnp.full_like(p, inner_lr), theta)
        return init_server(rnd.server_tx, {"theta": theta, "alpha": alpha})

    adapt = gd_adapt(model, inner_lr, steps=inner_steps, params_of=theta_of, seed=split_seed,
                     alpha_of=(lambda st: st.params["alpha"]) if learn_alpha else None)
    return MetaAlgorithm(name=name, init=init, round=rnd.round, model=model,
                         client_params=client_params_of_global(theta_of), global_params=theta_of,
                         check=rnd.check, setup=rnd.setup, server_round=rnd,
                         adapt=adapt, adapt_split=lambda data: split_support_query(
                             data, support_fraction, seed=split_seed)[0])


def _variant(variant: str, doc: str):
    def factory(model: Model, *, inner_lr: float = 0.5, inner_steps: int = 3,
                support_fraction: float = 0.2, split_seed: int = 0,
                setup: Setup = Setup()) -> MetaAlgorithm:
        return _fedmeta(model, built, setup, variant=variant, inner_lr=inner_lr,
                        inner_steps=inner_steps, support_fraction=support_fraction,
                        split_seed=split_seed)
    factory.__name__ = factory.__qualname__ = f"fedmeta_{variant}"
    factory.__doc__ = (f"FedMeta with {doc} (module docstring). inner_lr: alpha (Meta-SGD: its "
                       "initial value), may be traced; inner_steps: GD steps on the support set; "
                       "support_fraction, split_seed: the support / query split (core/meta.py).")
    built = defaults(FEDMETA, uses=USES,
                     no_hypergrad=FOMAML_NO_HYPERGRAD if variant == "fomaml" else None)(factory)
    return built


fedmeta_maml = _variant("maml", "MAML: the second-order meta-gradient through the inner loop")
fedmeta_fomaml = _variant("fomaml", "FOMAML: the first-order meta-gradient grad L_Q(theta')")
fedmeta_metasgd = _variant("metasgd", "Meta-SGD: a learned per-parameter inner step alpha")
