"""Ditto (Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021, Algorithm 1).

Two problems share one round. The global model solves the usual federated objective with any
global solver built from the round skeleton (core/skeleton.py; `global_solver`, FedAvg by default,
`functools.partial(fedprox, mu=...)`, "fedadam", ...):

    w* = argmin_w G(F_1(w), ..., F_N(w))

and every client k keeps a personal model v_k, a row of the state [N, ...], solving

    min_{v_k}  h_k(v_k; w*) = F_k(v_k) + lam/2 * ||v_k - w*||^2 .

Round t, sampled clients S_t, for k in S_t (vmapped):
    v_k <- v_k - eta_p * (grad F_k(v_k) + lam * (v_k - w_t))        s = personal_steps times
    w_{t+1} = the global solver's round from w_t                     local_steps per client
Unsampled clients keep their v_k. `client_params` returns v_k; `global_params` returns w_t.
lam -> 0 gives local training, lam -> inf the global model. Ditto adds only the personal update:
the global half is the solver's `server_round.step`, so the setup's aggregator (median, trimmed
mean, krum ...), attack, uplink and server optimizer all act on the global model. eta_p =
`personal_lr` (default: the client optimizer's lr), with the client optimizer's rule.

Stragglers (`LocalWork.stragglers`, FedProx Sec. 5.2) do less work on both problems: by default the
personal steps reuse the global steps' batches and mask, so a straggler's personal work is cut
exactly as its global work; with `personal_steps=s` a straggler that does q of its local_steps
global steps does ceil(s * q / local_steps) personal steps (the same fraction, at least one).
Whether their global updates enter the aggregate is the global solver's rule (FedAvg drops them,
FedProx keeps them; `LocalWork(drop_stragglers=...)` overrides it); their personal models keep the
partial work either way.

Choosing lam: the paper selects it per client on local validation data from {0.05, 0.1, 0.2}
under strong attacks and {0.1, 1, 2} otherwise (Sec. 5 / App. C); `experiments/reproduce/ditto.py`
picks it on held-out validation clients' data from such a grid.

Paper vs. official code (github.com/litian96/ditto, flearn/trainers_MTL/ditto.py): the code
interleaves one personal step and one global step on *the same mini-batch*, for local_iters
steps; the paper leaves the batches open. We take the code's reading by default (the personal
steps reuse the global steps' batches, `personal_steps=None`); `personal_steps=s` draws s
independent personal batches instead. Personal models start at w_0 (the code does the same).
The personal optimizer's state (e.g. momentum) restarts every round, as the code's plain SGD has
none. The code's `dynamic_lam` (a per-step choice of lam on validation loss) is not implemented.
Sampling and weighting: the code's default (`--sampling 2`, fedbase.select_clients) draws the C
clients with probability n_k / n without replacement (numpy `choice(replace=False, p=...)`) and
averages their updates uniformly (`simple_average`); our defaults are uniform sampling and n_k
weighting, as in FedAvg. `Cohort(sampling="size_distinct", weighting="uniform")` is the code's
scheme (`sampling="size"` draws by size with replacement, as FedProx's Algorithm 2 does).

Attacks (the setup's `attacks.Adversary`): a fixed set of round(fraction * N) malicious clients
either corrupt their global update w_k - w_t (sign_flip: -scale * (w_k - w_t); random_update: the
paper's A2 "random updates"; scaled: its "model replacement"; gaussian, alie) or train on flipped
labels (label_flip, y -> num_classes - 1 - y, which then also feeds their own personal models).
Benign clients' v_k only see w_t through lam. The code's variants differ in detail: its boosting
factor is clients_per_round (ours `Adversary.scale`, default 10), and its label poisoning draws
uniformly random labels on FEMNIST/Fashion-MNIST (1 - y on CelebA, -y on Vehicle) rather than
flipping them.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from fedjax_lab.algorithms.fedavg import FEDAVG
from fedjax_lab.algorithms.fedprox import proximal_term
from fedjax_lab.extend import (Model, Optimizer, RowAlgorithm, RowRound, ServerRound, Setup,
                               client_keys, defaults, draw_batches, local_train, row_algorithm,
                               validate, weighted_mean_scalar, with_drop)


@defaults(FEDAVG)
def ditto(model: Model, *, lam: float = 0.1, personal_lr: Optional[float] = None,
          personal_steps: Optional[int] = None,
          global_solver: Union[str, Callable] = "fedavg",
          setup: Setup = Setup()) -> RowAlgorithm:
    """Ditto around `global_solver` (module docstring); lam and personal_lr may be traced.

    lam: personalization strength; personal_lr: step size eta_p of the personal updates (default
    the client optimizer's lr); personal_steps: s personal steps on their own batches (default:
    the global steps' batches); global_solver: a registered algorithm name ("fedavg", "fedprox",
    "fedadam", ...; "name:opt=value,..." sets its own hyperparameters, e.g. "fedprox:mu=0.1") or a
    factory (`functools.partial(algorithms.fedprox, mu=0.1)`) whose algorithm is built from the
    round skeleton. `setup` goes to the global solver, over its defaults.
    """
    validate.non_negative("lam", lam)
    if personal_lr is not None:
        validate.positive("personal_lr", personal_lr)
    if personal_steps is not None:
        validate.positive("personal_steps", personal_steps, integer=True)
    solver, solver_name = _solver(global_solver)
    takes_setup = "setup" in inspect.signature(solver).parameters
    rnd = getattr(solver(model, setup=setup), "server_round", None) if takes_setup else None
    if not isinstance(rnd, ServerRound):
        raise ValueError(
            f"global_solver={solver_name!r} is no solver built from the round skeleton (it "
            f"{'gives server_round=None' if takes_setup else 'takes no setup='}); expected a "
            f"factory(model, setup=...) whose algorithm has a core.skeleton.ServerRound as "
            f"server_round, such as {', '.join(_qualifying(model))}")
    s = with_drop(rnd.setup, rnd.drops_stragglers)
    if personal_steps is not None and s.work.epochs is not None:
        raise ValueError("personal_steps must be None (reuse the global batches) when "
                         f"epochs is set, got personal_steps={personal_steps}")
    personal_tx = _personal_optimizer(s.client_opt, personal_lr).build("client_optimizer")
    work = s.work

    def personal_batches(data, part, k_pers):
        if personal_steps is None:
            return part.batches.idx, part.batches.step_mask
        pb = draw_batches(k_pers, data, part.ids, batch_size=work.batch_size,
                          local_steps=personal_steps, shuffle=work.shuffle)
        # stragglers do the fraction of their personal work that they do of their global work
        q = part.batches.num_steps
        p_steps = (personal_steps * q + work.local_steps - 1) // work.local_steps
        return pb.idx, pb.step_mask & (jnp.arange(personal_steps)[None, :] < p_steps[:, None])

    def step(server, v, ids, data, key):
        part, v, data, (k_train, k_pers) = rnd.begin_rows(key, data, ids, v, streams=3)
        w_t = server.params
        # v_k: steps on h_k(v; w_t) = F_k(v) + lam/2 ||v - w_t||^2 from the client's own v_k
        prox = proximal_term(lam)
        personal = local_train(model, personal_tx, extra_loss=lambda v_k: prox(v_k, w_t))
        idx, mask = personal_batches(data, part, k_pers)
        pres = jax.vmap(personal, in_axes=(0, None, None, 0, 0, 0))(
            v, data.x, data.y, idx, mask, client_keys(k_pers, part.ids))
        server, metrics = rnd.step(server, data, part, k_train=k_train, key=key)
        real = part.valid.astype(jnp.float32)
        metrics.update(personal_loss=weighted_mean_scalar(pres.loss, real),
                       personal_objective=weighted_mean_scalar(pres.objective, real))
        return server, rnd.end_rows(pres.params, ids), metrics

    spec = RowRound(init_server=rnd.init, init_row=lambda server: server.params,
                    sample=functools.partial(rnd.sample, streams=3),
                    step=step, params=lambda server, rows: rows)
    alg = row_algorithm(spec, model=model, global_params=lambda st: st.params,
                        check=rnd.check, config=dict(global_solver=solver_name))
    return dataclasses.replace(alg, setup=s)


def _personal_optimizer(client_opt: Optimizer, personal_lr) -> Optimizer:
    """The client optimizer's rule at lr personal_lr (its own lr when None)."""
    if personal_lr is None:
        return client_opt
    if client_opt.tx is not None:
        raise ValueError(f"personal_lr={personal_lr!r} needs a named client optimizer "
                         f"(Optimizer(name, lr=...)) to take its rule from, got the custom optax "
                         f"client optimizer {client_opt.name!r}; expected personal_lr=None (the "
                         "personal models then use that optimizer as it is)")
    return dataclasses.replace(client_opt, lr=personal_lr)


def _solver(global_solver):
    """(factory, name) of a registered algorithm name, "name:opt=value,...", or a factory."""
    from fedjax_lab.algorithms import ALGORITHMS
    if callable(global_solver):
        return global_solver, _solver_name(global_solver, ALGORITHMS)
    if not isinstance(global_solver, str):
        raise ValueError(f"global_solver must be a registered algorithm name or a factory, got "
                         f"{type(global_solver).__name__}")
    name, _, rest = global_solver.partition(":")
    pairs = [p.split("=", 1) for p in rest.split(",") if p.strip()]
    if name not in ALGORITHMS or any(len(p) != 2 for p in pairs):
        raise ValueError(f"global_solver must be a registered algorithm name (optionally "
                         f"'name:option=value,...'), got {global_solver!r}; valid names: "
                         f"{sorted(ALGORITHMS)}")
    opts = {k.strip(): _literal(v.strip()) for k, v in pairs}
    factory = ALGORITHMS[name][0]
    return (functools.partial(factory, **opts) if opts else factory), global_solver


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _solver_name(factory, registry) -> str:
    """A factory's name as the CLI spells it ("fedprox:mu=0.1" for a partial of a registered one)."""
    func = factory.func if isinstance(factory, functools.partial) else factory
    name = getattr(func, "__name__", repr(func))
    if not isinstance(factory, functools.partial):
        return name
    opts = ",".join(f"{k}={v!r}" for k, v in sorted(factory.keywords.items()))
    registered = registry.get(name, (None,))[0] is func and not factory.args
    return f"{name}:{opts}" if registered and opts else f"{name}({opts})"


def _qualifying(model) -> list:
    """The registered algorithms whose default build carries a ServerRound (for error messages)."""
    from fedjax_lab.algorithms import ALGORITHMS
    out = []
    for name, (factory, _) in sorted(ALGORITHMS.items()):
        if name == "ditto" or "setup" not in inspect.signature(factory).parameters:
            continue
        try:
            ok = isinstance(factory(model, setup=Setup()).server_round, ServerRound)
        except Exception:       # a factory that cannot be built with defaults does not qualify
            ok = False
        if ok:
            out.append(name)
    return out
