"""The plumbing every algorithm shares, as frozen values passed in (never re-listed as keywords):

    setup = Setup(cohort=Cohort(clients_per_round=10, sampling="size"),
                  work=LocalWork(epochs=20, batch_size=10, stragglers=0.9),
                  client_opt=Optimizer("sgd", lr=0.01),
                  aggregator=aggregators.trimmed_mean(beta=0.2),
                  attack=attacks.Adversary("sign_flip", fraction=0.2))
    alg = algorithms.fedprox(model, mu=1.0, setup=setup)

Who takes part (`Cohort`), how much local work (`LocalWork`), the client and server optimizers
(`Optimizer`: a named rule of core/optimizers.py with its hyperparameters, or any optax
GradientTransformation via `Optimizer.of(tx)`), how client messages are combined (an
`aggregators.Aggregator`) and who attacks (`attacks.Adversary`). A field left None takes the
algorithm's default (`Setup.over`): FedAdam's server optimizer is Adam, signSGD's cohort weights
clients uniformly, and `Setup(cohort=Cohort(20))` changes only the cohort of either.

Every value validates itself when built (ValueError naming the argument) and describes itself
(`describe()`: the flat {flag: value} that config.json records and the CLI reads back), so the factory
call is the config. `Setup.of(clients_per_round=20, client_lr=0.1, aggregator="median")` builds a
setup from those flat names (the CLI's flags, with `-` for `_`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import types
import typing
from typing import Any, Optional

import optax

from fedjax_lab.core import validate, values
from fedjax_lab.core.optimizers import make_optimizer


@dataclasses.dataclass(frozen=True)
class Cohort:
    """Who takes part in a round: `clients_per_round` C; `sampling` "uniform" (C distinct clients
    uniformly), "size" (C draws with p_k = n_k / n, with replacement: FedProx's Algorithm 2) or
    "size_distinct" (C distinct clients, successive draws by size); `weighting` of the aggregate:
    "examples" (p_k = n_k) or "uniform"."""
    clients_per_round: int = 10
    sampling: str = "uniform"
    weighting: str = "examples"

    def __post_init__(self):
        from fedjax_lab.core.sampling import SCHEMES
        validate.positive("clients_per_round", self.clients_per_round, integer=True)
        validate.one_of("sampling", self.sampling, set(SCHEMES))
        validate.one_of("weighting", self.weighting, {"examples", "uniform"})

    def check(self, data):
        validate.clients_per_round(self.clients_per_round, data.num_clients)


@dataclasses.dataclass(frozen=True)
class LocalWork:
    """How much each sampled client trains: batch_size B; either `local_steps` (steps mode) or
    `epochs` E (epochs mode, which overrides local_steps); `stragglers`: the fraction of sampled
    clients doing a random amount of work (FedProx Sec. 5.2), an integer number of epochs (or
    steps) in [1, E) with `straggler_work="code"` (default, the official code) or in [1, E] with
    "paper"; `drop_stragglers`: leave them out of the aggregate (None: the algorithm's default,
    FedAvg drops them, FedProx keeps their partial work); `shuffle`: "auto", "epoch" or
    "replacement" (core/batching.py); `client_chunk`: train the round's clients `client_chunk` at a
    time and accumulate the weighted mean on the fly, so a round's memory is that of
    `client_chunk` clients (None: all at once; needs the mean aggregator, no uplink or attack,
    since those need every client's message; same numbers up to float rounding).

    With sampling="size" a client drawn twice is the same device selected twice: it draws the same
    batches and the same local-training keys (both are folded from the client id), takes the
    straggler status and work of its first draw, so both copies compute the same update, and that
    update counts twice in the average (and twice in bytes and compute). Per-client rows written
    back from the copies are therefore identical.
    """
    batch_size: int = 10
    local_steps: int = 20
    epochs: Optional[int] = None
    stragglers: float = 0.0
    straggler_work: str = "code"
    drop_stragglers: Optional[bool] = None
    shuffle: str = "auto"
    client_chunk: Optional[int] = None

    def __post_init__(self):
        from fedjax_lab.core.sampling import STRAGGLER_WORK
        validate.positive("batch_size", self.batch_size, integer=True)
        validate.positive("local_steps", self.local_steps, integer=True)
        if self.epochs is not None:
            validate.positive("epochs", self.epochs, integer=True)
        validate.fraction("stragglers", self.stragglers)
        validate.one_of("straggler_work", self.straggler_work, set(STRAGGLER_WORK))
        validate.one_of("drop_stragglers", self.drop_stragglers, {None, True, False})
        validate.one_of("shuffle", self.shuffle, {"auto", "epoch", "replacement"})
        if self.client_chunk is not None:
            validate.positive("client_chunk", self.client_chunk, integer=True)

    def check(self, data):
        if data.max_client_size == 0:
            raise ValueError("data: every client is empty; there is nothing to train on")

    def num_steps(self, data) -> int:
        from fedjax_lab.core.batching import plan_steps
        return plan_steps(data, local_steps=self.local_steps, epochs=self.epochs,
                          batch_size=self.batch_size)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """A client or server optimizer: `name` in core/optimizers.OPTIMIZERS with learning rate `lr`
    (under `lr_schedule`: "constant" or "inv_sqrt", lr / sqrt(t + 1)), `momentum` (sgd), `b1`, `b2`,
    `eps` (adaptive rules; eps is Reddi et al.'s tau), or any optax
    GradientTransformation (`Optimizer.of(tx)`, recorded as "custom:" + a fingerprint of the
    hyperparameters its closures hold, so two different custom optimizers are told apart)."""
    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-3
    lr_schedule: str = "constant"
    tx: Any = dataclasses.field(default=None, metadata={"flag": False})

    FLAG_NAMES = {"name": "{prefix}_optimizer"}

    def __post_init__(self):
        if self.tx is not None:
            if not isinstance(self.tx, optax.GradientTransformation):
                raise ValueError(f"optimizer must be an optax.GradientTransformation, got "
                                 f"{type(self.tx).__name__}")
            return
        make_optimizer(self.name, self.lr, momentum=self.momentum, eps=self.eps, b1=self.b1,
                       b2=self.b2, lr_schedule=self.lr_schedule)

    @classmethod
    def of(cls, tx) -> "Optimizer":
        """Wrap a name, an Optimizer or an optax transformation."""
        if isinstance(tx, Optimizer):
            return tx
        if isinstance(tx, str):
            return cls(tx)
        fp = hashlib.sha1(repr(values.fingerprint(tx)).encode()).hexdigest()[:12]
        return cls(name=f"custom:{fp}", tx=tx)

    def build(self, role: str = "optimizer") -> optax.GradientTransformation:
        if self.tx is not None:
            return self.tx
        return make_optimizer(self.name, self.lr, momentum=self.momentum, eps=self.eps,
                              b1=self.b1, b2=self.b2, lr_schedule=self.lr_schedule, arg=role)

    def describe(self, prefix=None) -> dict:
        flags = values.flag_fields(Optimizer, prefix)
        if self.tx is not None:
            return {flags[0][0]: self.name}
        keep = {"name", "lr", "lr_schedule"} | ({"momentum"} if self.name == "sgd"
                                                else {"b1", "b2", "eps"})
        return {flag: values.json_value(getattr(self, field))
                for flag, field, _, _ in flags if field in keep}


@dataclasses.dataclass(frozen=True)
class ValueKind:
    """A kind of shared value defined above core (aggregators/, attacks.py, uplink.py): its type,
    its default value, how to build one by name (`get(name, **options)`: the CLI's --aggregator
    NAME) and whether its dataclass fields are flags (attacks.Adversary)."""
    type: type
    default: Any
    get: Any = None
    flags: bool = False


VALUE_KINDS: dict = {}   # Setup field -> ValueKind, filled by the packages that define them


def register_value_kind(field: str, kind: ValueKind) -> None:
    """Called by aggregators/, attacks.py and uplink.py when imported, so that core imports no
    layer above it."""
    if field not in ("aggregator", "attack", "uplink"):
        raise ValueError(f"field must be 'aggregator', 'attack' or 'uplink', got {field!r}")
    VALUE_KINDS[field] = kind


def value_kinds() -> dict:
    missing = {"aggregator", "attack", "uplink"} - set(VALUE_KINDS)
    if missing:       # fedjax_lab/__init__ imports those packages before anything builds a Setup
        raise RuntimeError(f"no value kind registered for {sorted(missing)}: import fedjax_lab "
                           "(its __init__ imports aggregators, attacks and uplink first)")
    return VALUE_KINDS


SETUP_FIELDS = ("cohort", "work", "client_opt", "server_opt", "aggregator", "attack", "uplink")
PREFIX = {"client_opt": "client", "server_opt": "server"}


@dataclasses.dataclass(frozen=True)
class Setup:
    """The shared values of an algorithm (module docstring); None fields take its defaults."""
    cohort: Optional[Cohort] = None
    work: Optional[LocalWork] = None
    client_opt: Optional[Optimizer] = None
    server_opt: Optional[Optimizer] = None
    aggregator: Any = None
    attack: Any = None
    uplink: Any = None
    overrides: tuple = ()     # ((flat name, value), ...) from Setup.of, applied by `over`

    def __post_init__(self):
        kinds = dict(cohort=Cohort, work=LocalWork, client_opt=Optimizer, server_opt=Optimizer,
                     **{f: k.type for f, k in value_kinds().items()})
        for field, kind in kinds.items():
            v = getattr(self, field)
            if field in ("client_opt", "server_opt") and v is not None:
                object.__setattr__(self, field, v := Optimizer.of(v))
            if field == "aggregator" and isinstance(v, str):
                object.__setattr__(self, field, v := VALUE_KINDS["aggregator"].get(v))
            if v is not None and not isinstance(v, kind):
                raise ValueError(f"Setup.{field} must be a {kind.__module__}.{kind.__name__} "
                                 f"(or None for the algorithm's default), got {type(v).__name__}")

    def over(self, defaults: "Setup") -> "Setup":
        """This setup with its None fields taken from `defaults`, and the rest defaulted."""
        base = dict(cohort=Cohort(), work=LocalWork(), client_opt=Optimizer("sgd", lr=0.01),
                    server_opt=Optimizer("sgd", lr=1.0),
                    **{f: k.default() for f, k in value_kinds().items()})
        pick = lambda f: next(v for v in (getattr(self, f), getattr(defaults, f), base[f])
                              if v is not None)
        resolved = Setup(**{f: pick(f) for f in SETUP_FIELDS})
        for layer in (defaults.overrides, self.overrides):
            if layer:
                resolved = resolved._apply(dict(layer))
        return resolved

    def check(self, data):
        self.cohort.check(data)
        self.work.check(data)

    def describe(self, prefix=None) -> dict:
        """The flat {flag: value} of every value (None fields are left out)."""
        out = {}
        for f in SETUP_FIELDS:
            v = getattr(self, f)
            if v is not None:
                out.update(values.describe(v, PREFIX.get(f)))
        return out

    @classmethod
    def of(cls, **flat) -> "Setup":
        """A Setup from flat names, applied on top of the algorithm's defaults: Cohort's and
        LocalWork's fields, client_/server_ optimizer fields (client_lr, server_optimizer ...),
        aggregator (+ its options as aggregator_OPTION), attack, attack_fraction, attack_scale,
        attack_seed. `Setup.of(server_lr=0.05)` keeps FedAdam's Adam and changes its lr."""
        valid = set(setup_flags()) | {"uplink"}
        unknown = sorted(k for k in flat if k not in valid
                         and not k.startswith(("aggregator_", "uplink_")))
        if unknown:
            raise ValueError(f"Setup.of: unknown name(s) {unknown}; valid names: {sorted(valid)}, "
                             "aggregator_OPTION and uplink_OPTION")
        return cls(overrides=tuple(sorted(flat.items())))

    def _apply(self, overrides: dict) -> "Setup":
        aggregators, uplink = VALUE_KINDS["aggregator"], VALUE_KINDS["uplink"]
        out = {f: getattr(self, f) for f in SETUP_FIELDS}
        for f, kind in _value_kinds():
            names = {flag for flag, *_ in values.flag_fields(kind, PREFIX.get(f))}
            mine = {k: overrides[k] for k in overrides if k in names}
            if mine:
                try:
                    out[f] = values.from_flags(kind, mine, base=out[f], prefix=PREFIX.get(f))
                except ValueError as e:     # "lr must be > 0" -> "client_lr must be > 0"
                    raise ValueError(_flag_message(str(e), kind, PREFIX.get(f))) from e
        opts = {k[len("aggregator_"):]: v for k, v in overrides.items() if k.startswith("aggregator_")}
        if "aggregator" in overrides:
            out["aggregator"] = aggregators.get(overrides["aggregator"], **opts)
        elif opts:
            agg = out["aggregator"]
            out["aggregator"] = aggregators.get(agg.name, **{**dict(agg.options), **opts})
        up_opts = {k[len("uplink_"):]: v for k, v in overrides.items() if k.startswith("uplink_")}
        if "uplink" in overrides:
            out["uplink"] = uplink.get(overrides["uplink"], **up_opts)
        elif up_opts:
            out["uplink"] = uplink.get(out["uplink"].name, **{**dict(out["uplink"].options), **up_opts})
        return Setup(**out)


def _flag_message(msg: str, kind, prefix) -> str:
    for flag, field, _, _ in values.flag_fields(kind, prefix):
        if msg.startswith(field + " ") and flag != field:
            return flag + msg[len(field):]
    return msg


def _value_kinds():
    """(field, dataclass) of the values whose fields are flags."""
    return (("cohort", Cohort), ("work", LocalWork), ("client_opt", Optimizer),
            ("server_opt", Optimizer)) + tuple((f, k.type) for f, k in value_kinds().items()
                                               if k.flags)


def setup_flags(uses=frozenset(SETUP_FIELDS)) -> dict:
    """{flag: (type, default)} of the values a Setup holds (those in `uses`; aggregator options
    excluded)."""
    out = {}
    for f, kind in _value_kinds():
        if f in uses:
            for flag, _, typ, default in values.flag_fields(kind, PREFIX.get(f)):
                out[flag] = (typ, default)
    if "aggregator" in uses:
        out["aggregator"] = (str, "mean")
    return out


ALL_FIELDS = frozenset(SETUP_FIELDS)


DEFAULT_MODEL = "logistic"


def defaults(setup: Setup, uses=ALL_FIELDS, model: Optional[str] = None,
             no_hypergrad: Optional[dict] = None):
    """Attach an algorithm's default Setup (and the Setup fields it uses) to its factory: the
    CLI offers those fields' flags with these defaults, and `resolve` rejects the others.
    `model`: the name (models.MODELS) of the model the algorithm's mechanism needs when the user
    names none (FedGKT's client/server pair "gkt", a body/head split "mlp"); None: "logistic".
    `no_hypergrad`: {hyperparameter name, or "*" for all: why} of the hyperparameters whose path
    to the trained model crosses a stop_gradient or a step without a useful derivative, so that
    `fl.hypergrad` refuses them instead of returning 0 or a biased value."""
    unknown = set(uses) - ALL_FIELDS
    if unknown:
        raise ValueError(f"defaults(uses=...): unknown Setup field(s) {sorted(unknown)}")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"defaults(model=...) must be a model name (models.MODELS), got {model!r}")
    if no_hypergrad is not None and not (isinstance(no_hypergrad, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in no_hypergrad.items())):
        raise ValueError(f"defaults(no_hypergrad=...) must be a dict {{name or '*': reason}}, "
                         f"got {no_hypergrad!r}")

    def wrap(factory):
        signature = inspect.signature(factory)
        recorded = _scalar_params(factory, signature)

        @functools.wraps(factory)
        def build(*args, **kwargs):
            alg = factory(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return stamp(alg, build, {k: v for k, v in bound.arguments.items() if k in recorded})
        build.defaults, build.uses = setup, frozenset(uses)
        build.default_model = model or DEFAULT_MODEL
        build.no_hypergrad = dict(no_hypergrad or {})
        return build
    return wrap


def _scalar_params(factory, signature) -> set:
    """The factory's own keyword arguments that config.json records: those annotated bool, int,
    float or str (or Optional of one), the ones a flag can set; models and other objects are the
    algorithm's to describe (under "derived")."""
    try:
        hints = typing.get_type_hints(factory)
    except Exception:                      # unresolvable annotations: record every argument
        return {p for p in signature.parameters if p not in ("model", "setup")}
    scalar = lambda t: t in (bool, int, float, str) or (
        typing.get_origin(t) in (typing.Union, types.UnionType)
        and all(a in (bool, int, float, str, type(None)) for a in typing.get_args(t)))
    return {p for p in signature.parameters if p not in ("model", "setup")
            and scalar(hints.get(p, float))}


def stamp(alg, factory, own: dict):
    """`alg` as its factory's call records it, so that an algorithm file writes no config:
        name     the factory's name, unless the algorithm named itself (local top-k without
                 error feedback is "local_topk_no_ef")
        config   config.json: the factory's (registered) name, the model's name, the fields of
                 the resolved `alg.setup` that the factory uses, and each of the factory's own
                 arguments (`own`, bound from its signature with the defaults applied); what the
                 algorithm records itself in `alg.config` wins (a value it derives, or
                 `derived`: what no flag sets)
    An algorithm whose own setup is not resolved (alg.setup None) is left as it is."""
    if not hasattr(alg, "config") or getattr(alg, "setup", None) is None:
        return alg
    record = lambda v: {k: record(x) for k, x in v.items()} if isinstance(v, dict) \
        else values.json_value(v)
    config = dict(algorithm_config(factory.__name__, alg.model, alg.setup, factory.uses, **own),
                  **record(alg.config or {}))
    return dataclasses.replace(alg, name=alg.name or factory.__name__, config=config)


def default_model(factory) -> str:
    """The name of the model `factory` runs when the user names none (`defaults(model=...)`)."""
    func = getattr(factory, "func", factory)           # functools.partial of a factory
    return getattr(factory, "default_model", None) or getattr(func, "default_model", None) \
        or DEFAULT_MODEL


def resolve(setup: Setup, factory, *, drop_stragglers: Optional[bool] = None) -> Setup:
    """`setup` over the factory's defaults; a value the algorithm has no use for is an error.
    `drop_stragglers`: the algorithm's default for LocalWork(drop_stragglers=None) (with_drop)."""
    if not isinstance(setup, Setup):
        raise ValueError(f"setup must be a fedjax_lab.Setup, got {type(setup).__name__}")
    name = getattr(factory, "__name__", "algorithm")
    uses = getattr(factory, "uses", ALL_FIELDS)
    given = {f for f in SETUP_FIELDS if getattr(setup, f) is not None}
    given |= {_field_of(k) for k, _ in setup.overrides}
    unused = sorted(given - uses)
    if unused:
        raise ValueError(f"{name} takes no Setup.{', Setup.'.join(unused)}: it uses "
                         f"{', '.join(sorted(uses))}")
    resolved = setup.over(getattr(factory, "defaults", Setup()))
    return resolved if drop_stragglers is None else with_drop(resolved, drop_stragglers)


def with_drop(setup: Setup, default: bool) -> Setup:
    """`setup` with LocalWork.drop_stragglers decided: the user's choice, else the algorithm's
    `default`, so that the Setup (and config.json, from it) holds what the round does."""
    if setup.work.drop_stragglers is not None:
        return setup
    return dataclasses.replace(setup, work=dataclasses.replace(setup.work, drop_stragglers=default))


def _field_of(flat_name: str) -> str:
    if flat_name.startswith("aggregator"):
        return "aggregator"
    for f, kind in _value_kinds():
        if flat_name in {flag for flag, *_ in values.flag_fields(kind, PREFIX.get(f))}:
            return f
    return "uplink"


def algorithm_config(name: str, model, setup: Setup, uses=ALL_FIELDS, derived=None,
                     **hparams) -> dict:
    """config.json of an algorithm: its name, model, own hyperparameters and its values' fields.
    `derived`: what the run also records but no flag sets (FedGKT's server model, which follows
    from --model; FedProto's group models): kept under "derived", which `run --config` skips."""
    flat = {k: v for f in SETUP_FIELDS if f in uses and getattr(setup, f) is not None
            for k, v in values.describe(getattr(setup, f), PREFIX.get(f)).items()}
    config = dict(algorithm=name, model=model.name, **flat,
                  **{k: values.json_value(v) for k, v in hparams.items()})
    if derived:
        config["derived"] = {k: values.json_value(v) for k, v in derived.items()}
    return config
