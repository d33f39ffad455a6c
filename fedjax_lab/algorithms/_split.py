"""Which parameters are a model's head: the body / head split the personalization canon uses.

The zoo's models split as apply == head o features (core/types.Model); the head is one top-level
module of the params tree, named per model here (the one table of it):

    mlp, mlp_bn: "out"      cnn, cnn_bn, cnn_cifar, resnet, resnet8: "fc"      logistic: "Dense_0"

(for a model with BatchNorm the module sits under params["params"]; its "batch_stats" belong to
the body). models/hypernet.head_leaves finds the same leaves from the jaxpr of `head` given a
sample input (tests/test_fedper.py checks the table against it); the algorithms' factories have
no sample input, so they read the table. Logistic regression is all head: it has no body to share
or keep, and the body/head algorithms refuse it.

`keep_on_client(model, "head" | "body")` is the skeleton's `local_split` for FedPer and FedRep
(the head stays on each client) and LG-FedAvg (the body does); `train_only` wraps a client
optimizer so that only one part moves (FedBABU's frozen head, FedRep's phases).
"""
from __future__ import annotations

import optax
from flax import traverse_util

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


def keep_on_client(model, local: str):
    """local_split(params) -> (shared, local) for the skeleton's `local_split` hook: the `local`
    part ("head" or "body") of the model stays on each client as its row, the other is averaged."""
    head = head_name(model)

    def local_split(params):
        body, head_part = split(params, head)
        return (body, head_part) if local == "head" else (head_part, body)
    return local_split
