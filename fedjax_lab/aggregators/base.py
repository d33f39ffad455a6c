"""The Aggregator record (its own module, so that aggregators built elsewhere in this package,
such as DP-FedAvg's in aggregators/privacy.py, import it without a cycle)."""
from __future__ import annotations

import dataclasses
from typing import Callable

from fedjax_lab.core import values


@dataclasses.dataclass(frozen=True, eq=False)
class Aggregator:
    """`aggregate(updates, weights)` with the options it was built with (`options`, by name).

    Two variants, both called by the round skeleton through `apply`: a class with `needs_key`
    True takes the round key, aggregate(updates, weights, key) (DP's server noise,
    aggregators/privacy.py); `has_aux=True` returns (update, aux), aux a dict of scalars that the
    skeleton adds to the round's metrics (adaptive clipping's next clip norm); agg(updates,
    weights[, key]) is the update alone."""
    name: str
    aggregate: Callable          # (updates [C, ...], weights [C]) -> update
    check: Callable[[int], None] = lambda clients_per_round: None
    options: tuple = ()          # ((option, value), ...) as passed to the factory
    has_aux: bool = False        # aggregate returns (update, aux dict)
    needs_key = False            # aggregate takes the round key too (a class attribute)

    def __call__(self, updates, weights, key=None):
        return self.apply(updates, weights, key)[0]

    def apply(self, updates, weights, key=None):
        """(update, aux): aux is {} unless has_aux."""
        if self.needs_key and key is None:
            raise ValueError(f"aggregator {self.name!r} draws its noise from the round key: call "
                             "it as agg(updates, weights, key) (the round skeleton does)")
        out = self.aggregate(updates, weights, key) if self.needs_key \
            else self.aggregate(updates, weights)
        return out if self.has_aux else (out, {})

    def describe(self, prefix=None) -> dict:
        return {"aggregator": self.name,
                **{f"aggregator_{k}": values.json_value(v) for k, v in self.options}}
