"""Hyperparameter gradients: d L_val(w_R(h)) / d h through R scanned rounds of training.

    value, grads = fl.hypergrad(algorithms.fedprox, data, model=model, wrt={"mu": 0.1,
                                "client_lr": 0.05, "server_lr": 1.0}, rounds=50, key=0,
                                setup=setup)

For float hyperparameters h (client_lr, server_lr, personal_lr, FedProx's mu, Ditto's lam, ...;
the names of `fl.sweep`: factory keywords and flat Setup names), with w_0 = init(k_init) and
w_r = Round(w_{r-1}; h, fold_in(k_rounds, r)) (the keys of `fl.run(..., key=key)`):

    L_val(h) = sum_{k, i in val_k} loss(f(w_R(h), x_ki), y_ki) / sum_k |val_k|

the example-weighted validation loss of the global model (or, for a personalized algorithm, of
every client's own model `client_params(state, k)`: Ditto's v_k, whose loss is what lam moves),
i.e. the driver's `test_loss` (`test_personal_loss`) on the `validation` split (default
data.test). Client sampling, batch drawing and stragglers depend on the keys only, never on h, so
L_val is a differentiable function of h for a fixed key, and reverse mode through `lax.scan`
gives dL/dh exactly (to float rounding) for the price of about three forward passes.

Memory (remat). Reverse mode keeps what the backward pass needs:
  * remat="none": every round's intermediates (local steps' activations, optimizer states):
    memory O(R * round), the fastest.
  * remat="round" (default): `jax.checkpoint` on each round; only the R carried states are kept
    and a round is recomputed in the backward pass: memory O(R * |state| + round), time about
    one extra forward pass.
  * remat=k (an int): rounds in segments of k, each segment checkpointed and each round inside
    too (two-level checkpointing): memory O((R / k + k) * |state| + round), k ~ sqrt(R) gives
    O(sqrt(R) * |state|), at about two extra forward passes.
Measured growth with R is in experiments/tune_by_hypergrad.py --memory (README).

Right or refused. Where a stop_gradient or a step with no useful derivative lies on the path from
a hyperparameter to the loss, reverse mode returns 0 or a biased value, not dL/dh: Per-FedAvg's
direction enters local training through a stop_gradient surrogate, FOMAML stops the gradient of
its inner steps, signSGD votes with sign(), FetchSGD and local top-k select coordinates, a median
or Krum aggregator selects clients, a sign / top-k / QSGD uplink jumps. An algorithm declares such
names (`setup.defaults(no_hypergrad={name or "*": why})`; `NOT_DIFFERENTIABLE` for the files
that do not; the Setup's aggregator and uplink are checked on the built algorithm) and
`hypergrad` raises a ValueError naming the algorithm and the hyperparameter before tracing. A
name the algorithm needs as a Python number (a shape, a branch) is refused when it is traced.
Every accepted (algorithm, hyperparameter) is checked against central finite differences in
tests/test_hypergrad.py.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp

from fedjax_lab.core import validate
from fedjax_lab.core.driver import _as_key
from fedjax_lab.core.evaluate import global_sums, personal_sums
from fedjax_lab.core.setup import Setup
from fedjax_lab.core.sweep import Program, check_names
from fedjax_lab.core.types import Model


@dataclasses.dataclass(frozen=True)
class Hypergrad:
    """value: L_val at `wrt`; grads: {name: dL_val / d name}; personal: which models were scored."""
    value: float
    grads: dict
    personal: bool


def _rounds(round_fn, state, first: int, length: int, remat):
    """lax.scan of round_fn(state, r) over rounds first + 1 ... first + length, rematerialized."""
    if length == 0:
        return state
    step = lambda s, r: (round_fn(s, r), None)
    if remat == "none":
        return jax.lax.scan(step, state, first + 1 + jnp.arange(length))[0]
    step = jax.checkpoint(step)
    if remat == "round" or remat >= length:
        return jax.lax.scan(step, state, first + 1 + jnp.arange(length))[0]
    k = remat
    segments, tail = divmod(length, k)

    @jax.checkpoint
    def segment(s, rs):
        return jax.lax.scan(step, s, rs)[0], None
    rs = (first + 1 + jnp.arange(segments * k)).reshape(segments, k)
    state = jax.lax.scan(segment, state, rs)[0]
    return jax.lax.scan(step, state, first + 1 + segments * k + jnp.arange(tail))[0]


def validation_loss(alg, state, split, personal: bool):
    """Example-weighted mean loss on `split` (the driver's test_loss / test_personal_loss)."""
    if personal:
        loss, _, count = personal_sums(alg.model, alg.client_params, state, split)
    else:
        loss, _, count = global_sums(alg.model, alg.global_params(state), split)
    return jnp.sum(loss) / jnp.maximum(jnp.sum(count), 1.0)


@functools.partial(jax.jit, static_argnames=("program", "rounds", "remat", "personal"))
def _value_and_grad(program: Program, values, data, validation, key, *, rounds: int, remat,
                    personal: bool):
    k_init, k_rounds = jax.random.split(key)

    def objective(values):
        alg = program.build(values)
        state = alg.init(k_init, data)
        state = _rounds(lambda s, r: alg.round(s, data, jax.random.fold_in(k_rounds, r))[0],
                        state, 0, rounds, remat)
        return validation_loss(alg, state, validation, personal)
    return jax.value_and_grad(objective)(values)


def hypergrad(factory, data, *, wrt: dict, rounds: int, key, model: Optional[Model] = None,
              fixed: Optional[dict] = None, setup: Setup = Setup(), validation=None,
              personal: Optional[bool] = None, remat: Union[str, int] = "round") -> Hypergrad:
    """dL_val/dh after `rounds` rounds of `factory` (module docstring). wrt: {name: value} of the
    float hyperparameters to differentiate; fixed: {name: value} of others (any kind); validation:
    a FederatedArrays split with the training data's clients (default data.test); personal: score
    client_params (default: alg.personalized); remat: "round", "none" or a segment length;
    model: None runs the algorithm's default model (`setup.default_model(factory)`)."""
    validate.positive("rounds", rounds, integer=True)
    if not isinstance(wrt, dict) or not wrt:
        raise ValueError(f"wrt must be a non-empty dict {{name: float}}, got {wrt!r}")
    fixed = dict(fixed or {})
    kinds = check_names(factory, list(wrt) + list(fixed), what="wrt")
    refuse_not_differentiable(factory, wrt)
    both = sorted(set(wrt) & set(fixed))
    if both:
        raise ValueError(f"fixed: {both} also in wrt")
    for name, v in wrt.items():
        if kinds[name][0] == "model" or kinds[name][1] not in (float, None) or isinstance(v, bool) \
                or not isinstance(v, (int, float)):
            raise ValueError(f"wrt[{name!r}] must be a float hyperparameter with a float value, "
                             f"got {v!r} (type {kinds[name][1]})")
    if not (remat in ("round", "none") or (isinstance(remat, int) and not isinstance(remat, bool)
                                            and remat > 0)):
        raise ValueError(f"remat must be 'round', 'none' or a positive int segment length, "
                         f"got {remat!r}")
    validation = data.test if validation is None else validation
    if validation is None or validation.num_examples == 0:
        raise ValueError("validation: needs a split with examples (data.test is empty or None)")
    if validation.num_clients != data.num_clients:
        raise ValueError(f"validation must have the training data's {data.num_clients} clients, "
                         f"got {validation.num_clients}")
    model = fixed.pop("model", model)
    if model is None:
        from fedjax_lab import models
        from fedjax_lab.core.setup import default_model
        model = models.get(default_model(factory), data.num_classes, data.x[:1])
    program = Program(factory=factory, model=model,
                      static=tuple(sorted(fixed.items())), traced=tuple(sorted(wrt)),
                      kinds=tuple(sorted((k, v[0]) for k, v in kinds.items())), setup=setup)
    alg = program.build({k: float(v) for k, v in wrt.items()})    # validates the values
    refuse_non_smooth_setup(alg, wrt)
    alg.check(data)
    if getattr(alg, "evaluate_sums", None) is not None:     # core/hetero: one model per group
        raise ValueError(f"wrt: {sorted(wrt)}: {alg.name} scores clients of different "
                         "architectures (evaluate_sums); fl.hypergrad needs one model to score")
    if personal is None:
        personal = bool(alg.personalized)
    if not personal and alg.global_params is None:
        raise ValueError(f"personal=False needs a global model; {alg.name} has none")
    values = {k: jnp.float32(v) for k, v in wrt.items()}
    try:
        value, grads = _value_and_grad(program, values, data, validation, _as_key(key)[0],
                                       rounds=rounds, remat=remat, personal=personal)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError,
            jax.errors.TracerIntegerConversionError, ValueError, TypeError) as e:
        # The values were checked as Python numbers above (program.build), so an error now comes
        # from tracing: the algorithm uses one of them where only a concrete number will do.
        raise ValueError(f"wrt: {sorted(wrt)}: {alg.name} needs one of them as a Python number "
                         f"(it cannot be differentiated): {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return Hypergrad(value=float(value), grads={k: float(g) for k, g in grads.items()},
                     personal=personal)


# Algorithms whose files declare nothing (`setup.defaults(no_hypergrad=...)`) but whose update
# crosses a step without a useful derivative on the way from every hyperparameter to the loss.
SIGN_VOTE = ("the clients' updates reach the server through sign(), whose derivative is 0 "
             "wherever it exists, so dL/dh would drop every path through the clients")
TOP_K = ("the update reaches the model through a top-k selection, which jumps when the "
         "selected coordinates change, so reverse mode sees only the fixed selection's branch")
NOT_DIFFERENTIABLE = {"signsgd": {"*": SIGN_VOTE}, "noisy_signsgd": {"*": SIGN_VOTE},
                      "fetchsgd": {"*": TOP_K}, "local_topk": {"*": TOP_K}}


def not_differentiable(factory) -> dict:
    """{name or "*": why} of the hyperparameters `fl.hypergrad` refuses for `factory`."""
    func = getattr(factory, "func", factory)
    declared = getattr(factory, "no_hypergrad", None) or getattr(func, "no_hypergrad", None) or {}
    return {**NOT_DIFFERENTIABLE.get(getattr(func, "__name__", ""), {}), **declared}


def refuse_not_differentiable(factory, wrt):
    """ValueError naming the algorithm and the hyperparameter when a name of `wrt` is one whose
    hypergradient the algorithm declares wrong (a stop_gradient or a zero-derivative step on the
    path): refused before anything is traced or compiled."""
    table = not_differentiable(factory)
    fname = getattr(getattr(factory, "func", factory), "__name__", "the algorithm")
    for name in sorted(wrt):
        why = table.get(name, table.get("*"))
        if why is not None:
            raise ValueError(f"wrt: {fname} cannot be differentiated with respect to {name!r}: "
                             f"{why}; the hypergradient would be 0 or biased, not dL/d{name}. "
                             f"Use finite differences of fl.sweep runs instead")


# Shared values whose output jumps (or whose derivative is 0) as their inputs move: on the path
# from every hyperparameter, whichever algorithm uses them. The rest (mean, dp_mean's clipping,
# norm_clip, identity and noise uplinks) are continuous and differentiable almost everywhere.
NON_SMOOTH_AGGREGATORS = {
    "median": "which client's value is each coordinate's median changes along the path",
    "trimmed_mean": "which clients are trimmed changes along the path",
    "geometric_median": "its Weiszfeld iterations are not differentiated as the fixed point",
    "krum": "which client is selected changes along the path",
    "multi_krum": "which clients are selected changes along the path",
    "sign": "sign() has derivative 0 wherever it exists"}
SMOOTH_UPLINKS = frozenset({"identity", "noise"})


def refuse_non_smooth_setup(alg, wrt):
    """ValueError naming the algorithm and `wrt` when its resolved Setup aggregates or sends
    through a step without a useful derivative (NON_SMOOTH_AGGREGATORS, an uplink other than
    identity / noise): checked on the built algorithm, before anything is traced."""
    setup = getattr(alg, "setup", None)
    agg = getattr(setup, "aggregator", None)
    if agg is not None and agg.name in NON_SMOOTH_AGGREGATORS:
        raise ValueError(f"wrt: {sorted(wrt)}: {alg.name} aggregates with {agg.name!r}, which is "
                         f"not differentiable along the path ({NON_SMOOTH_AGGREGATORS[agg.name]}); "
                         "the hypergradient would not be dL/dh. Use finite differences of "
                         "fl.sweep runs, or a mean aggregator")
    up = getattr(setup, "uplink", None)
    if up is not None and getattr(up, "name", "identity") not in SMOOTH_UPLINKS:
        raise ValueError(f"wrt: {sorted(wrt)}: {alg.name} sends through the {up.name!r} uplink, "
                         "which jumps as the update moves (sign, top-k, quantization); the "
                         "hypergradient would not be dL/dh. Use finite differences of fl.sweep "
                         "runs instead")


def memory_bytes(factory, data, *, wrt: dict, rounds: int, model: Model, remat="round",
                 fixed: Optional[dict] = None, setup: Setup = Setup(), personal=None) -> int:
    """XLA's temp memory (bytes) of the compiled hypergradient program (for the R scaling)."""
    fixed = dict(fixed or {})
    kinds = check_names(factory, list(wrt) + list(fixed), what="wrt")
    refuse_not_differentiable(factory, wrt)
    program = Program(factory=factory, model=model, static=tuple(sorted(fixed.items())),
                      traced=tuple(sorted(wrt)),
                      kinds=tuple(sorted((k, v[0]) for k, v in kinds.items())), setup=setup)
    alg = program.build({k: float(v) for k, v in wrt.items()})
    personal = bool(alg.personalized) if personal is None else personal
    values = {k: jnp.float32(v) for k, v in wrt.items()}
    compiled = _value_and_grad.lower(program, values, data, data.test, jax.random.key(0),
                                     rounds=rounds, remat=remat, personal=personal).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)
