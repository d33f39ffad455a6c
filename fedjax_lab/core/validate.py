"""Argument checks that run before anything is traced. Each error names the argument.

A traced value (a hyperparameter swept by vmap) passes the numeric checks: it has no value yet.
"""
from __future__ import annotations

import math

from fedjax_lab.core.values import is_traced


def positive(name: str, value, *, integer: bool = False):
    if is_traced(value):          # a swept hyperparameter: checked by the caller's grid, not here
        return
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not _finite(value) or value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def non_negative(name: str, value):
    if is_traced(value):
        return
    if not _finite(value) or value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def fraction(name: str, value, *, closed_right: bool = True):
    if is_traced(value):
        return
    ok = _finite(value) and 0 <= value and (value <= 1 if closed_right else value < 1)
    if not ok:
        raise ValueError(f"{name} must lie in [0, 1{']' if closed_right else ')'}, got {value!r}")


def one_of(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def clients_per_round(value, num_clients: int):
    positive("clients_per_round", value, integer=True)
    if value > num_clients:
        raise ValueError(f"clients_per_round={value} exceeds the number of clients in the data "
                         f"({num_clients}); expected 1 <= clients_per_round <= {num_clients}")


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
