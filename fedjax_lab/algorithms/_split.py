"""Which parameters are a model's head, and FedAvg with one part of the model kept on the clients.

The zoo's models split as apply == head o features (core/types.Model); the head is one top-level
module of the params tree, named per model here (the one table of it):

    mlp, mlp_bn: "out"      cnn, cnn_bn, cnn_cifar, resnet, resnet8: "fc"      logistic: "Dense_0"

(for a model with BatchNorm the module sits under params["params"]; its "batch_stats" belong to
the body). models/hypernet.head_leaves finds the same leaves from the jaxpr of `head` given a
sample input (tests/test_fedper.py checks the table against it); the algorithms' factories have
no sample input, so they read the table. Logistic regression is all head: it has no body to share
or keep, and the body/head algorithms refuse it.

`partial_sharing` is FedAvg in which a part of w (the head for FedPer and FedRep, the body for
LG-FedAvg) is a per-client row: client k starts from (shared part of w_t, its row), trains, sends
its shared part's update and keeps the rest; the server averages the shared part only. It is
FedBN's block (algorithms/fedbn.py) with another split; a `local_part=` hook of the skeleton
would hold it once.
"""
from __future__ import annotations

import dataclasses

import jax
import optax
from flax import traverse_util

from fedjax_lab.extend import (Optimizer, algorithm_config, dense_bytes, resolve, server_averaging,
                               tree_sub, tree_zeros_like)

HEAD = {"mlp": "out", "mlp_bn": "out", "cnn": "fc", "cnn_bn": "fc", "cnn_cifar": "fc",
        "resnet": "fc", "resnet8": "fc", "logistic": "Dense_0"}
NO_BODY = {"logistic"}
PARTS = ("body", "head")


def head_name(model) -> str:
    """The top-level module of `model`'s params that is its head (module docstring); ValueError
    naming `model` for a model without a known split or without a body."""
    name = getattr(model, "name", None)
    if getattr(model, "features", None) is None or getattr(model, "head", None) is None \
            or name not in HEAD:
        raise ValueError(f"model must have a features / head split of the zoo ({sorted(HEAD)}), "
                         f"got {name!r}")
    if name in NO_BODY:
        raise ValueError(f"model {name!r} is all head (no body to share or keep); use a model with "
                         f"a body, e.g. 'mlp'")
    return HEAD[name]


def _in_head(path, head: str) -> bool:
    return path[0] == head or (path[0] in ("params", "batch_stats") and len(path) > 2
                               and path[1] == head)


def split(params, head: str):
    """(body, head) sub-trees of params (nested dicts; each keeps its leaves' paths)."""
    flat = traverse_util.flatten_dict(params)
    pick = lambda keep: traverse_util.unflatten_dict(
        {p: v for p, v in flat.items() if _in_head(p, head) == keep})
    return pick(False), pick(True)


def merge(a, b):
    """The params tree holding the leaves of both parts."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(a),
                                         **traverse_util.flatten_dict(b)})


def part(params, head: str, which: str):
    return split(params, head)[PARTS.index(which)]


def head_labels(params, head: str):
    """A tree like params with "head" / "body" on each leaf (for optax.multi_transform)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: "head" if _in_head(p, head) else "body"
                                         for p in flat})


def train_only(tx: optax.GradientTransformation, head: str, which: str):
    """`tx` on the `which` part ("body" or "head") of the params, zero updates on the other."""
    other = "head" if which == "body" else "body"
    return optax.multi_transform({which: tx, other: optax.set_to_zero()},
                                 lambda params: head_labels(params, head))


def with_client_optimizer(model, setup, factory, wrap, **kw):
    """server_averaging with the setup's client optimizer replaced by wrap(tx) (FedRep's phases,
    FedBABU's frozen head); config.json and `alg.setup` keep the setup's own optimizer, so the CLI
    re-runs the algorithm from its config."""
    s = resolve(setup, factory)
    tx = wrap(s.client_opt.build("client_optimizer"))
    alg = server_averaging(model, dataclasses.replace(s, client_opt=Optimizer.of(tx)), factory,
                           **kw)
    hparams = {k: v for k, v in kw.items() if k not in _HOOKS}
    config = algorithm_config(factory.__name__, model, s, **hparams)
    config["drop_stragglers"] = alg.config["drop_stragglers"]
    return dataclasses.replace(alg, config=config, setup=s)


_HOOKS = {"objective", "drop_stragglers", "local_objective", "batch_objective", "message",
          "init_row", "new_row", "init_extra", "server_rule", "send_extra", "start", "up_bytes",
          "down_bytes"}


def shared_message(head: str, shared: str):
    """message(res, ctx): the update of the shared part only."""
    return lambda res, ctx: part(tree_sub(res.params, ctx.w_t), head, shared)


def partial_sharing(model, setup, factory, *, local: str, client_tx=None, **hparams):
    """FedAvg with the `local` part ("head" or "body") of w a per-client row (module docstring);
    client_tx(tx) -> tx wraps the client optimizer (None: the setup's own)."""
    head = head_name(model)
    shared = "body" if local == "head" else "head"
    hooks = dict(
        start=lambda w_t, row: merge(part(w_t, head, shared), row),
        message=shared_message(head, shared),
        init_row=lambda w: part(w, head, local),
        new_row=lambda res, ctx: part(res.params, head, local),
        server_rule=lambda ex, extra, n: (merge(ex.direction, tree_zeros_like(
            jax.tree.map(lambda r: r[0], ex.new_rows))), extra),
        down_bytes=lambda w_t, data: dense_bytes(part(w_t, head, shared)))
    if client_tx is None:
        return server_averaging(model, setup, factory, **hooks, **hparams)
    return with_client_optimizer(model, setup, factory, client_tx, **hooks, **hparams)
