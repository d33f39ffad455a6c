"""Named optax optimizers, so factories (and the CLI derived from their signatures) take plain
scalars and strings; an optax.GradientTransformation passes through unchanged."""
from __future__ import annotations

import optax

from fedjax_lab.core import validate

OPTIMIZERS = {
    "sgd": "plain SGD (with momentum when momentum > 0)",
    "adam": "Adam (FedAdam on the server; eps is Reddi et al.'s adaptivity tau)",
    "yogi": "Yogi (FedYogi on the server)",
    "adagrad": "Adagrad (FedAdagrad on the server)",
}


def make_optimizer(name_or_tx, lr: float, *, momentum: float = 0.0, eps: float = 1e-3,
                   b1: float = 0.9, b2: float = 0.99, arg: str = "optimizer"):
    if isinstance(name_or_tx, optax.GradientTransformation):
        return name_or_tx
    validate.one_of(arg, name_or_tx, OPTIMIZERS)
    validate.positive(f"{arg.replace('optimizer', 'lr')}", lr)
    validate.non_negative(f"{arg.replace('optimizer', 'momentum')}", momentum)
    if name_or_tx == "sgd":
        return optax.sgd(lr, momentum=momentum or None)
    if name_or_tx == "adam":
        return optax.adam(lr, b1=b1, b2=b2, eps=eps)
    if name_or_tx == "yogi":
        return optax.yogi(lr, b1=b1, b2=b2, eps=eps)
    return optax.adagrad(lr, eps=eps)
