"""FedRep (Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared Representations for
Personalized Federated Learning", ICML 2021, Algorithm 1).

The representation phi (the body, `features`) is shared; every client k keeps its head h_k (a
row). Round t, sampled client k:

    h_k   <- tau_h steps of SGD on F_k(phi^t, h) from h_k          (body fixed)
    phi_k <- tau   steps of SGD on F_k(phi, h_k) from phi^t         (head fixed, the new h_k)
    server: phi^{t+1} = sum_k n_k phi_k / sum_k n_k                  only phi travels
    deploy: client k uses (phi^t, h_k)                               (client_params: personalized)

Both phases run inside one local training: the client optimizer is the setup's, gated by phase
(an optax transformation counting the client's real steps: the first `head_steps` update the head
only, the rest the body only; each phase keeps its own optimizer state). So LocalWork's
local_steps S is the round's total, tau_h = head_steps (default S // 2) and tau = S - head_steps
(in epochs mode, where head_steps must be given, the first head_steps of the client's steps; a
straggler with fewer steps than head_steps trains its head only). `alternating=False` trains
head and body jointly at every step: FedPer exactly (the ablation). The client optimizer's
wrap is the skeleton's `client_tx` hook, the head as a row its `local_split`.

Paper vs. code (lgcollins/FedRep, models/Update.py): the code runs local_ep epochs of which the
first local_ep - local_rep_ep update the head (10 head epochs, 1 body epoch by default); here
steps instead of epochs, by default half of the round's steps on each part (`head_steps=10` with
`local_steps=11` is the code's 10:1).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms._split import head_name, keep_on_client, train_only
from fedjax_lab.extend import Setup, defaults, resolve, server_averaging, tree_where, validate


class PhaseState(NamedTuple):
    count: jax.Array      # real steps taken so far this round
    head: optax.OptState  # the head phase's optimizer state
    body: optax.OptState  # the body phase's


def head_then_body(tx: optax.GradientTransformation, head: str,
                   head_steps: int) -> optax.GradientTransformation:
    """`tx` on the head for the first head_steps updates, then on the body (module docstring)."""
    head_tx, body_tx = train_only(tx, head, "head"), train_only(tx, head, "body")

    def init(params):
        return PhaseState(jnp.zeros([], jnp.int32), head_tx.init(params), body_tx.init(params))

    def update(grads, state, params=None):
        on_head = state.count < head_steps
        u_head, s_head = head_tx.update(grads, state.head, params)
        u_body, s_body = body_tx.update(grads, state.body, params)
        updates = tree_where(on_head, u_head, u_body)     # each is zero on the other part
        return updates, PhaseState(state.count + 1, tree_where(on_head, s_head, state.head),
                                   tree_where(on_head, state.body, s_body))

    return optax.GradientTransformation(init, update)


@defaults(Setup(), model="mlp")
def fedrep(model, *, head_steps: Optional[int] = None, alternating: bool = True,
           setup: Setup = Setup()):
    """FedRep (module docstring): head_steps steps on the head (None: half of local_steps,
    rounded down), then the rest of the round's local steps on the body; alternating=False is
    FedPer."""
    if head_steps is not None:
        validate.positive("head_steps", head_steps, integer=True)
    validate.one_of("alternating", alternating, {True, False})
    head = head_name(model)
    s = resolve(setup, fedrep)
    if s.work.epochs is not None and head_steps is None:
        raise ValueError(f"head_steps must be given (a number of steps) in epochs mode "
                         f"(epochs={s.work.epochs}), got None")
    if s.work.epochs is None and head_steps is not None and head_steps >= s.work.local_steps:
        raise ValueError(f"head_steps={head_steps} leaves no body step: it must be < local_steps="
                         f"{s.work.local_steps} (the round's total)")
    tau_h = s.work.local_steps // 2 if head_steps is None else head_steps
    local_split = keep_on_client(model, "head")
    if not alternating:
        return server_averaging(model, s, fedrep, local_split=local_split)
    return server_averaging(model, s, fedrep, local_split=local_split,
                            client_tx=lambda tx: head_then_body(tx, head, tau_h))
