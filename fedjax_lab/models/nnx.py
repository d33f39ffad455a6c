"""Wrap a flax.nnx module as a pure Model(init, apply[, features, head, update_state]).

An nnx module carries its variables; a Model's functions take them as a pytree, so that they can
be stacked across clients and vmapped. `from_nnx` splits the module once (`nnx.split`) into its
graph (static) and its variables, and every call merges the graph with the given values
(`nnx.merge`) into a fresh module, runs it and throws it away:

    params (no BatchNorm)  = the nnx.Param values as a nested dict (nnx.to_pure_dict)
    params (BatchNorm)     = {"params": nnx.Param values, "batch_stats": nnx.BatchStat values}

the same layout as `from_linen`, so algorithms that read the model state (FedBN finds its local
layers as the modules holding params["batch_stats"]) work on either. Train mode is nnx's
`module.train()` (Dropout on, BatchNorm normalizes by the batch), eval mode `module.eval()`; the
RNG streams of the module (Dropout's) are reseeded from the `rng` argument in train mode, which
local training derives per client and per step. Other variables (RNG stream counters, custom
nnx.Variable types) keep the values they had when the module was wrapped.
"""
from __future__ import annotations

from typing import Callable, Union

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_lab.core.types import Model


def from_nnx(module: Union[nnx.Module, Callable[[nnx.Rngs], nnx.Module]],
             name: str | None = None) -> Model:
    """An nnx module as a Model (module docstring for the params layout).

    module: an nnx.Module instance, whose current values `init` returns whatever its key (every
    run starts from them), or a factory `make(rngs) -> nnx.Module` (e.g.
    `lambda rngs: MLP(784, 10, rngs=rngs)`), which `init(key, x)` calls with `nnx.Rngs(key)` so
    that seeds give different initial parameters.
    A module with `features(x)` and `head(z)` methods gets the representation split.
    """
    if isinstance(module, nnx.Module):
        make, template = None, module
    elif callable(module):
        make, template = module, module(nnx.Rngs(0))
        if not isinstance(template, nnx.Module):
            raise ValueError(f"module: the factory must return an nnx.Module, got "
                             f"{type(template).__name__}")
    else:
        raise ValueError(f"module must be an nnx.Module or a factory rngs -> nnx.Module, got "
                         f"{type(module).__name__}")
    name = name or type(template).__name__
    graphdef, *states = nnx.split(template, nnx.Param, nnx.BatchStat, ...)
    # own Variable objects: later changes to the user's module do not reach the Model
    param_state, stat_state, rest_state = (jax.tree.map(lambda v: v, s) for s in states)
    stateful = bool(jax.tree.leaves(stat_state))
    streams = sorted({s.key.tag for _, s in nnx.iter_graph(template) if isinstance(s, nnx.RngStream)})
    initial = _values(param_state, stat_state, stateful)

    def _fresh(template_state, values):
        # new Variable objects inside the current trace (nnx refuses to mutate ones made outside)
        state = jax.tree.map(lambda v: v, template_state)
        nnx.replace_by_pure_dict(state, values)
        return state

    def merged(params, train, rng):
        values, stats = (params["params"], params["batch_stats"]) if stateful else (params, None)
        m = nnx.merge(graphdef, _fresh(param_state, values),
                      _fresh(stat_state, stats) if stateful else jax.tree.map(lambda v: v, stat_state),
                      jax.tree.map(lambda v: v, rest_state))
        if train:
            m.train()
            if rng is not None and streams:
                nnx.reseed(m, **{tag: rng for tag in streams})
        else:
            m.eval()
        return m

    def init(key, sample_x=None):
        if make is None:   # fresh buffers: the driver donates the state it is handed
            return jax.tree.map(jnp.copy, initial)
        _, p, s, _ = nnx.split(make(nnx.Rngs(key)), nnx.Param, nnx.BatchStat, ...)
        return _values(p, s, stateful)

    def apply(params, x, *, train=False, rng=None):
        return merged(params, train, rng)(x)

    update_state = None
    if stateful:
        def update_state(params, new_params, x, rng=None):
            """The running statistics after a train-mode forward pass of `params` on x."""
            m = merged(params, True, rng)
            m(x)
            return {**new_params, "batch_stats": nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))}

    features = head = None
    if callable(getattr(template, "features", None)) and callable(getattr(template, "head", None)):
        def features(params, x, *, train=False, rng=None):
            return merged(params, train, rng).features(x)

        def head(params, z):
            return merged(params, False, None).head(z)

    return Model(init=init, apply=apply, features=features, head=head, name=name,
                 update_state=update_state)


def _values(param_state, stat_state, stateful):
    params = nnx.to_pure_dict(param_state)
    return {"params": params, "batch_stats": nnx.to_pure_dict(stat_state)} if stateful else params


def from_import_path(path: str, num_classes: int, sample_x=None, **options) -> Model:
    """The model named by a Python import path "package.module:attr" (the CLI's
    `--model mypkg.nets:MyNet`). `attr` is one of

        a factory    factory(num_classes, sample_x, **options) -> Model, nnx.Module or linen.Module
        an nnx.Module class, built as cls(in_features, num_classes, rngs=rngs, **options) with
                     in_features the size of one flattened example (nnx.Linear's convention)
        a linen.Module class, built as cls(num_classes, **options) (BatchNorm: `has_batch_norm`)

    sample_x: a batch of examples [batch, ...] (what the factory or in_features is read from).
    """
    import importlib

    import flax.linen as linen
    import numpy as np

    from fedjax_lab.models.base import from_linen

    module_name, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model {path!r}: cannot import {attr!r} from {module_name!r} "
                         f"({type(e).__name__}: {e})") from e

    def wrap(m):
        if isinstance(m, Model):
            return m
        if isinstance(m, nnx.Module):
            return from_nnx(m, path)
        if isinstance(m, linen.Module):
            return from_linen(m, path)
        raise ValueError(f"model {path!r}: the factory returned {type(m).__name__}, expected a "
                         f"fedjax_lab Model, an nnx.Module or a linen.Module")

    if isinstance(obj, type) and issubclass(obj, nnx.Module):
        if sample_x is None:
            raise ValueError(f"model {path!r}: an nnx.Module class needs a sample of the inputs "
                             f"(its in_features)")
        in_features = int(np.prod(sample_x.shape[1:]))
        return from_nnx(lambda rngs: obj(in_features, num_classes, rngs=rngs, **options), path)
    if isinstance(obj, type) and issubclass(obj, linen.Module):
        return wrap(obj(num_classes, **options))
    if callable(obj):
        return wrap(obj(num_classes, sample_x, **options))
    raise ValueError(f"model {path!r}: {attr!r} is a {type(obj).__name__}, not a factory or a "
                     f"module class")
