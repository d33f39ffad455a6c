"""Model zoo: flax.linen modules wrapped as pure Model records (see models.base).

MODELS maps a name (the CLI's `--model`) to (factory, one-line description); every factory is
`factory(num_classes, *, options...)`. `get(name, num_classes, sample_or_shape)` builds one by
name and checks, abstractly (jax.eval_shape: nothing is compiled or computed), that it accepts
the data's inputs and returns [batch, num_classes] logits.
"""
from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.core.types import Model
from fedjax_lab.models.base import from_linen
from fedjax_lab.models.cnn import cnn, cnn_bn, cnn_cifar
from fedjax_lab.models.gkt import gkt_pair
from fedjax_lab.models.linear import logistic, mlp, mlp_bn
from fedjax_lab.models.nnx import from_import_path, from_nnx
from fedjax_lab.models.quadratic import quadratic, quadratic_clients
from fedjax_lab.models.resnet import resnet, resnet8
from fedjax_lab.models.rnn import char_gru, char_lstm, char_rnn

MODELS = {
    "logistic": (logistic, "multinomial logistic regression"),
    "mlp": (mlp, "MLP with two hidden ReLU layers of 200 (FedAvg's 2NN)"),
    "mlp_bn": (mlp_bn, "the MLP with BatchNorm after each hidden layer (running statistics as model state)"),
    "cnn_bn": (cnn_bn, "the MNIST CNN with BatchNorm after each conv and the FC layer (FedBN's layout)"),
    "cnn": (cnn, "FedAvg's MNIST CNN: conv5x5 32, 64 (SAME) + pools, FC 512 (1,663,370 params)"),
    "cnn_cifar": (cnn_cifar, "PFLlib's FedAvgCNN for CIFAR (its FedProto/FedGen/Ditto "
                             "benchmarks): VALID convs 32, 64, FC 512 (878,538 params)"),
    "resnet8": (resnet8, "CIFAR ResNet-8 with GroupNorm (no batch statistics)"),
    "resnet": (resnet, "CIFAR ResNet-(6n+2) with GroupNorm; --depth 8, 14, 20, ..."),
    "gkt": (gkt_pair, "FedGKT's pair: client conv3x3(8) + pooled linear, server conv3x3(32) + FC 128 on the client's feature map"),
    "char_lstm": (char_lstm, "LEAF Shakespeare: embedding 8, 2-layer LSTM 256, next character"),
    "char_gru": (char_gru, "LEAF Shakespeare model with GRU cells"),
}

# What one example must look like: images [H, W, C] (floating), token ids [T] (integer), anything.
_INPUTS = {"cnn": "image", "cnn_bn": "image", "cnn_cifar": "image", "resnet8": "image", "resnet": "image",
           "char_lstm": "tokens", "char_gru": "tokens"}


def get(name: str, num_classes: int, sample_or_shape=None, **options) -> Model:
    """The model `name` for `num_classes` classes, e.g. `get("cnn", 10, data.x[:1])`.

    sample_or_shape: an array of examples with a leading batch axis (e.g. `data.x[:1]`) or the
    shape of one example (e.g. `(28, 28, 1)`); when given, the model is checked against it.
    options: the factory's keyword options (e.g. `dropout=0.5`, `depth=20`).
    name may also be a Python import path "package.module:attr" to the user's own factory or
    nnx/linen module class (models.nnx.from_import_path).
    Raises ValueError naming the argument: unknown name or option, wrong input rank or dtype, or
    inputs the architecture cannot take (e.g. images too small for VALID convolutions).
    """
    if name not in MODELS and ":" in name:     # "package.module:attr", a user's own model
        spec = None if sample_or_shape is None else _example_spec(name, sample_or_shape)
        sample = (None if spec is None else sample_or_shape if hasattr(sample_or_shape, "shape")
                  else np.zeros((1,) + spec[1], spec[2]))
        model = from_import_path(name, num_classes, sample, **options)
        if spec is not None:
            _check_inputs(name, model, num_classes, spec)
        return model
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {sorted(MODELS)} or a "
                         f"'package.module:attr' factory")
    factory = MODELS[name][0]
    valid = [p.name for p in list(inspect.signature(factory).parameters.values())[1:]
             if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; valid options: {valid}")
    model = factory(num_classes, **options)
    if sample_or_shape is not None:
        _check_inputs(name, model, num_classes, _example_spec(name, sample_or_shape))
    return model


def _example_spec(name, sample_or_shape):
    """(shape of one example, dtype) from a batch of examples or an example shape."""
    kind = _INPUTS.get(name, "any")
    if hasattr(sample_or_shape, "shape") and hasattr(sample_or_shape, "dtype"):
        if len(sample_or_shape.shape) < 1 or sample_or_shape.shape[0] < 1:
            raise ValueError(f"sample must be a non-empty batch of examples [batch, ...], got shape "
                             f"{tuple(sample_or_shape.shape)}")
        shape, dtype = tuple(sample_or_shape.shape[1:]), np.dtype(sample_or_shape.dtype)
        what = "sample"
    else:
        shape = tuple(sample_or_shape)
        if not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
            raise ValueError(f"input_shape must be a tuple of positive ints (one example's shape), "
                             f"got {sample_or_shape!r}")
        dtype = np.dtype(np.int32 if kind == "tokens" else np.float32)
        what = "input_shape"
    if kind == "image" and len(shape) != 3:
        hint = " (add a channel axis: x[..., None])" if len(shape) == 2 else ""
        raise ValueError(f"{what}: model {name!r} takes images of shape [height, width, channels] "
                         f"per example, got {shape}{hint}")
    if kind == "tokens" and (len(shape) != 1 or not jnp.issubdtype(dtype, jnp.integer)):
        raise ValueError(f"{what}: model {name!r} takes integer token ids of shape [sequence] per "
                         f"example, got shape {shape} and dtype {dtype}")
    if kind != "tokens" and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{what}: model {name!r} takes floating-point inputs, got dtype {dtype}")
    return what, shape, dtype


def _check_inputs(name, model, num_classes, spec):
    what, shape, dtype = spec
    x = jax.ShapeDtypeStruct((2,) + shape, dtype)
    try:
        params = jax.eval_shape(model.init, jax.random.key(0), x)
        out = jax.eval_shape(lambda p, v: model.apply(p, v, train=False), params, x)
    except Exception as e:  # flax/XLA shape errors: report them against the argument
        raise ValueError(f"{what}: model {name!r} cannot take examples of shape {shape} "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if out.shape != (2, num_classes):
        raise ValueError(f"{what}: model {name!r} maps examples of shape {shape} to outputs of "
                         f"shape {out.shape[1:]}, expected ({num_classes},) logits")


__all__ = ["quadratic", "quadratic_clients", "from_linen", "from_nnx", "get", "MODELS", "logistic", "mlp", "cnn", "cnn_cifar", "resnet",
           "resnet8", "char_rnn", "char_lstm", "char_gru"]
