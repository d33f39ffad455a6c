"""Writing an algorithm: the one module a new algorithm file imports from (with `fedjax_lab`).

An algorithm that averages client messages into a server step states only its paper's part as
hooks of the round skeleton (core/skeleton.py); the skeleton does sampling, batches on device, the
vmap over clients, uplink, attack, aggregation, the server optimizer, per-client rows, the mesh's
padding, the metrics (local_loss, local_objective, clients_aggregated) and the byte accounting:

    @defaults(Setup(client_opt=Optimizer("sgd", lr=0.01)))
    def fednova(model, *, setup: Setup = Setup()):
        return server_averaging(
            model, setup, fednova,
            message=lambda res, ctx: tree_scale(tree_sub(res.params, ctx.w_t), 1 / res.num_steps),
            server_rule=lambda ex, extra, n: (tree_scale(ex.direction, tau_eff(ex)), extra))

    register("fednova", fednova)          # `fedjax-lab run fednova`, sweeps, the conformance suite

The hooks (each optional):

    local_objective(w, ctx)               a term of client k's objective; ctx = ClientContext
                                          (w_t, row, extra, batches)
    batch_objective(w, xb, yb, rng, ctx)  a term of each step's batch (MOON)
    message(res, ctx) -> m_k              what the client sends (default res.params - w_t);
                                          res = LocalResult(params, opt_state, loss, num_steps,
                                          objective); `mean_loss(model, params, ctx)` is F_k on the
                                          client's batches of the round
    init_row(params), new_row(res, ctx)   a per-client row for all N clients
    init_extra(params)                    extra server state
    server_rule(ex, extra, num_clients)   -> (direction, extra): from the round's Exchange
                                          (direction = the aggregate of the messages, messages,
                                          weights p_k, num_steps, new_rows) to the direction that
                                          the server optimizer takes (w <- ServerOpt(w, -direction))
    send_extra                            the extra state goes down with w_t (bytes counted)
    start(w_t, row) -> w                  where a client starts and what it deploys: the
                                          algorithm is then personalized
    local_split(params) -> (shared, local)  a part of the model kept on each client (FedBN's
                                          BatchNorm layers, FedPer's head): start, message, rows
                                          and the server's direction follow from it
    client_tx(tx) -> tx                   wraps the client optimizer (FedRep's phases)

A round of one's own is built from the same pieces: `begin_round` (key split, cohort, batches,
stragglers, attack), `round_ids`, `participate`, `local_train`,
`client_weights`, `server_update`, `RowRound` + `row_algorithm` (docs: fedjax_lab/docs/
add_an_algorithm.py). Nothing here is new code: it is the public face of `core/`.
"""
from fedjax_lab.registry import register
from fedjax_lab.core import comm, hetero, meta, validate, values
from fedjax_lab.core.batching import Batches, draw_batches
from fedjax_lab.core.comm import dense_bytes
from fedjax_lab.core.client_state import ClientRows, RowAlgorithm, RowRound, row_algorithm
from fedjax_lab.core.evaluate import client_params_of_global, personal_sums, summarize
from fedjax_lab.core.hetero import HeteroAlgorithm
from fedjax_lab.core.local import LocalResult, local_train
from fedjax_lab.core.meta import (MetaAlgorithm, check_support_fraction, finetune, gd_adapt,
                                  gd_steps, masked_loss, split_support_query, support_query_rows)
from fedjax_lab.core.optimizers import schedule
from fedjax_lab.core.rounds import (ServerState, client_weights, init_server, participate,
                                    sample_ids, server_update, weighted_mean_scalar)
from fedjax_lab.core.sampling import first_draw
from fedjax_lab.core.setup import (Cohort, LocalWork, Optimizer, Setup, algorithm_config, defaults,
                                   resolve, with_drop)
from fedjax_lab.core.skeleton import (ClientBatches, ClientContext, Exchange, ServerRound,
                                      begin_round, client_keys, local_delta, map_clients,
                                      mean_loss, merge_trees, round_ids, server_averaging)
from fedjax_lab.core.tree import (flatten, tree_add, tree_broadcast, tree_num_params, tree_put,
                                  tree_scale, tree_sq_norm, tree_sub, tree_take, tree_vdot,
                                  tree_weighted_mean, tree_where, tree_zeros_like)
from fedjax_lab.core.types import Algorithm, Model, batch_loss

__all__ = [
    # the skeleton and its hooks' types
    "register", "server_averaging", "ServerRound", "Exchange", "ClientContext", "ClientBatches",
    "LocalResult", "mean_loss", "merge_trees", "local_delta", "map_clients", "client_keys",
    # setup and config
    "Cohort", "LocalWork", "Optimizer", "Setup", "algorithm_config", "defaults", "resolve",
    "with_drop", "validate", "values", "schedule",
    # round pieces for an algorithm with a round of its own
    "begin_round", "round_ids", "ServerState", "client_weights", "init_server", "participate",
    "sample_ids", "first_draw",
    "server_update", "weighted_mean_scalar", "local_train", "Batches", "draw_batches",
    "client_params_of_global", "personal_sums", "summarize", "comm", "dense_bytes",
    # per-client rows, meta-learning, heterogeneous architectures
    "ClientRows", "RowAlgorithm", "RowRound", "row_algorithm", "meta", "MetaAlgorithm",
    "check_support_fraction", "finetune", "gd_adapt", "gd_steps", "masked_loss",
    "split_support_query", "support_query_rows", "hetero", "HeteroAlgorithm",
    # trees and types
    "flatten", "tree_add", "tree_broadcast", "tree_num_params", "tree_put", "tree_scale",
    "tree_sq_norm", "tree_sub", "tree_take", "tree_vdot", "tree_weighted_mean", "tree_where",
    "tree_zeros_like", "Algorithm", "Model", "batch_loss",
]
