"""The algorithm registry: `ALGORITHMS` maps a name of `fedjax-lab run NAME` to (factory, one-line
description); `register` adds one from anywhere, a user's own file included:

    import fedjax_lab as fl
    fl.register("myalg", myalg)           # now `fl.algorithms.ALGORITHMS["myalg"]`, the CLI
                                          # (with --plugin FILE or an entry point), sweeps, and
                                          # the conformance suite know it

A package can register its algorithms without being imported by hand: an entry point in the group
`fedjax_lab.algorithms` (name = the algorithm's name, value = "module:factory") is loaded by
`load_entry_points()`, which the CLI calls.
"""
from __future__ import annotations

import re

ALGORITHMS: dict = {}
ENTRY_POINT_GROUP = "fedjax_lab.algorithms"


def register(name: str, factory, description: str | None = None, *, replace: bool = False):
    """Make `factory(model, *, <hyperparameters>, setup=Setup())` runnable as `name`.
    `description` defaults to the first line of its docstring. Returns the factory, so it can be
    used as a decorator through functools.partial or directly."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"name must be a lower-case identifier such as 'my_fedavg', got {name!r}")
    if not callable(factory):
        raise ValueError(f"factory must be callable (model, *, ..., setup=Setup()) -> Algorithm, "
                         f"got {type(factory).__name__}")
    if name in ALGORITHMS and ALGORITHMS[name][0] is not factory and not replace:
        raise ValueError(f"name {name!r} is registered already (to "
                         f"{getattr(ALGORITHMS[name][0], '__module__', '?')}); pass replace=True "
                         "to replace it")
    doc = (getattr(factory, "__doc__", None) or name).strip().splitlines()[0]
    ALGORITHMS[name] = (factory, description or doc)
    return factory


def load_entry_points() -> list:
    """Register every algorithm of the installed packages' `fedjax_lab.algorithms` entry points;
    returns their names."""
    from importlib.metadata import entry_points
    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in ALGORITHMS:
            register(ep.name, ep.load())
            names.append(ep.name)
    return names
