"""FedBABU (Oh, Kim, Yun, "FedBABU: Toward Enhanced Representation for Federated Image
Classification", ICLR 2022, Algorithm 1).

The head theta_h is drawn at random once and never trained in federated training: clients update
the body theta_b only, and only the body is averaged ("body aggregation, body update"):

    client k:  theta_b,k <- tau local SGD steps on F_k(theta_b, theta_h^0) from theta_b^t
               (the head's update is zero: the client optimizer is masked, optax.set_to_zero)
    server:    theta_b^{t+1} = sum_k n_k theta_b,k / sum_k n_k       only the body travels
    evaluate:  client k fine-tunes (theta_b^T, theta_h^0) on its train split for `finetune_steps`
               mini-batch steps of the client optimizer (batch: the setup's batch_size) and is
               scored on its test split: `test_adapted_*` (alg.adapt, core/meta.finetune)

finetune_part="head" fine-tunes the head only (the abstract's "the head is fine-tuned for
personalization during the evaluation process"); "full" fine-tunes body and head together.
`freeze_head=False` trains and averages the head too: FedAvg (bit for bit), evaluated after the
same fine-tuning, i.e. the FedAvg + fine-tuning baseline the paper compares against.

Paper vs. code: the paper fine-tunes for tau_f epochs; here a number of mini-batch steps. The
global model's head (`global_params`) is theta_h^0 throughout; the clients hold it from the
start, so only the body goes up and down. The server's extra state holds theta_h^0's shapes to
re-insert its zero update after aggregation (uplinks and noise never touch the head).
"""
from __future__ import annotations

import dataclasses

from fedjax_lab.algorithms._split import head_name, part, train_only
from fedjax_lab.extend import (MetaAlgorithm, Setup, defaults, dense_bytes, finetune, merge_trees,
                               resolve, server_averaging, tree_sub, tree_zeros_like, validate)


@defaults(Setup(), model="mlp")
def fedbabu(model, *, finetune_steps: int = 10, finetune_part: str = "head",
            freeze_head: bool = True, setup: Setup = Setup()):
    """FedBABU (module docstring): the body trained and averaged, the head frozen at its random
    initialization; `alg.adapt` fine-tunes (finetune_part) for finetune_steps steps."""
    validate.positive("finetune_steps", finetune_steps, integer=True)
    validate.one_of("finetune_part", finetune_part, {"head", "full"})
    validate.one_of("freeze_head", freeze_head, {True, False})
    head = head_name(model)
    s = resolve(setup, fedbabu)
    if freeze_head:
        body = lambda w: part(w, head, "body")
        alg = server_averaging(
            model, s, fedbabu, client_tx=lambda tx: train_only(tx, head, "body"),
            message=lambda res, ctx: body(tree_sub(res.params, ctx.w_t)),
            init_extra=lambda w: tree_zeros_like(part(w, head, "head")),
            server_rule=lambda ex, zero_head, n: (merge_trees(ex.direction, zero_head), zero_head),
            down_bytes=lambda w_t, data: dense_bytes(body(w_t)))
    else:
        alg = server_averaging(model, s, fedbabu)
    tx = s.client_opt.build("client_optimizer")
    adapt = finetune(model, train_only(tx, head, "head") if finetune_part == "head" else tx,
                     steps=finetune_steps, batch_size=s.work.batch_size,
                     params_of=lambda state: state.params)
    return MetaAlgorithm(**{f.name: getattr(alg, f.name) for f in dataclasses.fields(alg)},
                         adapt=adapt)
