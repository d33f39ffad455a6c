"""Independent reference rounds, one module per algorithm family, for tests/test_conformance.py.

`REFERENCES: dict[str, Callable]` maps a registered algorithm name (a key of
`fedjax_lab.algorithms.ALGORITHMS`, what `fedjax-lab list` shows) to its reference. It is built by
importing every module of this package (pkgutil; modules whose name starts with "_" are helpers and
are skipped) and merging their module-level dicts `REFERENCE = {"algname": fn, ...}`. Adding an
algorithm's reference is adding a file `tests/references/<family>.py` with such a dict; nothing
else is edited. A name claimed by two modules is an error at import.

The contract of a reference fn
------------------------------

    fn(alg, data, state, key) -> dict

alg    the Algorithm under test, built by the suite as
           ALGORITHMS[name][0](models.get(MODEL.get(name, "logistic"), C, data.x[:1]),
                               setup=Setup.of(**flags))
       flags = TINY_SETUP updated with SETUP.get(name, {}), keeping only the flat Setup names the
       algorithm uses (`cli.setup_params(factory)`): the factory's default hyperparameters (read
       them from `alg.config`, never assume them) and the resolved shared values in `alg.setup`
       (cohort, work, client_opt, server_opt, ...). The logistic model is apply(x) = x @ kernel +
       bias, params {"Dense_0": {"kernel": [d, C], "bias": [C]}}.
data   the tiny FederatedArrays `fedjax_lab.data.load(TINY_DATASET, seed=0)`.
state  the state before round 1 of `fl.run(alg, data, rounds=..., key=0)`:
       `alg.init(k_init, data)` with `k_init, k_rounds = jax.random.split(jax.random.key(0))`.
       Read it (np.asarray); it is the suite's own copy.
key    round 1's key `jax.random.fold_in(k_rounds, 1)`: the suite compares against the state
       after round 1 of that `fl.run` (the jitted `alg.round(state, data, key)` in the driver's scan).

Returns a dict with at least one of
    "global":  numpy pytree expected of `alg.global_params(new_state)`;
    "clients": numpy pytree, leaves stacked [N, ...] over ALL N clients, expected of
               `alg.client_params(new_state, jnp.arange(N))` (personalized methods; for a method
               without client rows this is the global model broadcast);
and optionally "rtol" / "atol" (default 1e-5 / 1e-5, float32 round vs float64 reference).
The suite compares with `np.testing.assert_allclose` leaf by leaf after checking that the tree
structures match, and fails naming the algorithm and the leaf.

What a reference may and may not use
------------------------------------
It is written from the paper's equations in plain numpy / unjitted loops, one client after another.
It may use from the library only what decides WHICH clients and examples take part in the round,
so that both sides draw the same participation: `tests.references._common.participation(alg,
data, key)` (core.rounds.participate with the round's key split, as the skeleton documents it), and
jax.random with keys split the way the algorithm's docstring specifies (e.g. the noise of noisy
signSGD). It must never call the module it checks, its helpers, optax's version of an optimizer the
paper defines differently, or the same noise function: a reference that takes its expected value
from the code under test cannot fail. Shared numpy pieces (softmax cross-entropy gradients, the
server optimizers of Reddi et al.) live in `_common.py`.

Optional module-level dicts beside REFERENCE (both keyed by algorithm name):
    SETUP = {"algname": {flat Setup.of name: value}}   when the tiny shared setting does not suit it
    MODEL = {"algname": "mlp"}   a `models.get` / `fedjax-lab run --model` name, when logistic does not
                                 suit it (both must be expressible as CLI flags: the suite re-runs
                                 the algorithm from its config.json through `fedjax-lab run --config`)
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

# dim 40: d = 123 logistic parameters, enough for FetchSGD / local top-k default k = 100
TINY_DATASET = "synthetic:1,1,clients=6,dim=40,classes=3,min_size=3,max_size=24"
TINY_SETUP = dict(clients_per_round=4, local_steps=3, batch_size=4)
RTOL = ATOL = 1e-5

REFERENCES: dict[str, Callable] = {}
SETUP: dict[str, dict] = {}
MODEL: dict[str, str] = {}
OWNER: dict[str, str] = {}


def _collect():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name, fn in getattr(module, "REFERENCE", {}).items():
            if name in OWNER:
                raise ImportError(f"reference for {name!r} defined twice: tests/references/"
                                  f"{OWNER[name]}.py and {info.name}.py")
            OWNER[name] = info.name
            REFERENCES[name] = fn
        SETUP.update(getattr(module, "SETUP", {}))
        MODEL.update(getattr(module, "MODEL", {}))


_collect()
