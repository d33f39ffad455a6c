"""Frozen values that describe themselves: the records of the shared plumbing (core/setup.py),
aggregators, attacks and uplinks are dataclasses whose fields are their options.

    describe(value)          -> {flag name: JSON value}, what config.json records
    flag_fields(value_type)  -> [(flag name, field name, type, default)], what the CLI offers

A value type names its flags with `FLAG_PREFIX` ("client" makes `lr` the flag `client_lr`) and may
rename single fields in `FLAG_NAMES` (the optimizer's `name` is `client_optimizer`). Fields that are
not scalars are not flags. A hyperparameter may also be a traced JAX value (a sweep vmapped over
it): `is_traced` tells the validators to leave it alone and `describe` records it as "traced".
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

import jax

SCALARS = (bool, int, float, str)


def is_traced(value) -> bool:
    """True for an abstract JAX value (inside jit / vmap): it cannot be checked or printed."""
    return isinstance(value, jax.core.Tracer)


def scalar_type(annotation, default):
    """bool/int/float/str of a field or parameter (Optional[int] -> int), else None."""
    if annotation in SCALARS:
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and args[0] in SCALARS:
        return args[0]
    if float in args and int in args:
        return float
    return type(default) if isinstance(default, SCALARS) else None


def flag_name(cls, field: str, prefix=None) -> str:
    prefix = getattr(cls, "FLAG_PREFIX", "") if prefix is None else prefix
    names = getattr(cls, "FLAG_NAMES", {})
    if field in names:
        return names[field].format(prefix=prefix)
    return f"{prefix}_{field}" if prefix else field


def flag_fields(cls, prefix=None):
    """[(flag, field, type, default)] of a value type's scalar fields (see the module docstring);
    `prefix` overrides the type's FLAG_PREFIX (one Optimizer type serves "client" and "server")."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        typ = scalar_type(hints.get(f.name), default)
        if typ is not None and f.metadata.get("flag", True):
            out.append((flag_name(cls, f.name, prefix), f.name, typ, default))
    return out


def json_value(v) -> Any:
    if is_traced(v):
        return "traced"
    if isinstance(v, SCALARS) or v is None:
        return v
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    if isinstance(v, (tuple, list)):
        return [json_value(x) for x in v]
    return repr(v)


def describe(value, prefix=None) -> dict:
    """{flag: value} of a value's scalar fields (the same keys its CLI flags and config use)."""
    if hasattr(value, "describe"):
        return value.describe(prefix)
    return {flag: json_value(getattr(value, field))
            for flag, field, _, _ in flag_fields(type(value), prefix)}


def from_flags(cls, flags: dict, base=None, prefix=None):
    """A `cls` value from {flag: value} (missing flags keep `base`'s fields, or the defaults)."""
    kwargs = {field: flags[flag] for flag, field, _, _ in flag_fields(cls, prefix) if flag in flags}
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def fingerprint(fn, depth: int = 8) -> list:
    """The scalars a function's closures hold, recursively (through nested functions, tuples and
    records): two optax transformations built with different hyperparameters differ here."""
    out, seen = [], set()

    def walk(v, d):
        if d < 0 or id(v) in seen:
            return
        seen.add(id(v))
        if isinstance(v, SCALARS) or v is None:
            out.append(v)
        elif hasattr(v, "shape") and getattr(v, "size", 2) == 1 and not is_traced(v):
            out.append(float(v))
        elif isinstance(v, (tuple, list)):
            for x in v:
                walk(x, d - 1)
        elif callable(v) and hasattr(v, "__code__"):
            out.append(v.__qualname__)
            for cell in v.__closure__ or ():
                try:
                    walk(cell.cell_contents, d - 1)
                except ValueError:        # an empty cell
                    pass
            for c in v.__code__.co_consts:
                if isinstance(c, (int, float)):
                    out.append(c)
        elif hasattr(v, "_fields"):       # NamedTuple, e.g. optax.GradientTransformation
            walk(tuple(v), d - 1)
    walk(fn, depth)
    return out
