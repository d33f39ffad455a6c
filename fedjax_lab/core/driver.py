"""The run driver: `eval_every` rounds per jitted `lax.scan`, then evaluation, logging,
checkpoints and the progress bar on the host.

Round r (1-based) uses the key fold_in(k_rounds, r), so a run resumed from a checkpoint at round
r replays exactly the rounds an uninterrupted run would: same seed, same metrics.jsonl, bit for bit
on one backend. The jitted chunk takes the Algorithm as a static argument (identity-hashed), so
repeated chunks and repeated `run` calls with the same algorithm and shapes compile once.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.core import checkpoint as ckpt
from fedjax_lab.core import sharding, validate
from fedjax_lab.core.evaluate import evaluation_metrics, evaluation_sums
from fedjax_lab.core.types import Algorithm


@dataclasses.dataclass
class RunResult:
    state: Any
    history: list          # one dict per evaluation, as written to metrics.jsonl


@functools.partial(jax.jit, static_argnames=("alg", "length"), donate_argnames=("state",))
def run_rounds(alg: Algorithm, state, data, key, first_round, length: int):
    """Rounds first_round + 1 ... first_round + length in one XLA program; per-round metrics stacked."""
    def body(state, r):
        return alg.round(state, data, jax.random.fold_in(key, r))
    return jax.lax.scan(body, state, first_round + 1 + jnp.arange(length))


evaluate = jax.jit(evaluation_sums, static_argnums=0)


@functools.partial(jax.jit, static_argnames=("alg",))
def init_state(alg: Algorithm, key, data):
    """`alg.init(key, data)` as one XLA program: run eagerly, a model's init is dozens of one-op
    programs, each traced, lowered and compiled on its own (~30 ms apiece here; a conformance case
    of FedGKT compiled 86 of them)."""
    return alg.init(key, data)


def data_fingerprint(data) -> str:
    """Cheap identity of a dataset (sizes, shapes and a checksum), stored with checkpoints."""
    h = hashlib.sha1()
    for split in (data, data.test):
        if split is None:
            continue
        h.update(np.asarray(split.offsets).tobytes())
        h.update(str((split.x.shape, str(split.x.dtype))).encode())
        h.update(np.float64(jnp.sum(split.x.astype(jnp.float32))).tobytes())
        h.update(np.asarray(split.y).tobytes())
    return h.hexdigest()[:16]


def _as_key(key):
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key)), int(key)
    if not isinstance(key, jax.Array):
        raise ValueError(f"key must be an int seed or a jax PRNG key, got {type(key).__name__}")
    raw = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return key, np.asarray(raw).tolist()


def run(alg: Algorithm, data, *, rounds: int, key, eval_every: int = 10, out: Optional[str] = None,
        checkpoint_every: Optional[int] = None, resume: bool = False, progress: bool = True,
        extra_config: Optional[dict] = None, mesh=None, callbacks: Sequence = (),
        accountant: Any = None) -> RunResult:
    """Train `alg` on `data` for `rounds` rounds; evaluate every `eval_every` rounds.

    out: directory for config.json, metrics.jsonl and checkpoints/ (orbax).
    checkpoint_every: save every so many rounds (a multiple of eval_every) and at the end.
    resume: continue from the last checkpoint in `out`; its config must match this run's.
    A non-finite training or evaluation loss stops the run with FloatingPointError naming the round.
    mesh: a `jax.sharding.Mesh` with a 'clients' axis (`core.sharding.client_mesh()`): each round's
    clients are split over its devices, across hosts after `jax.distributed.initialize`; every
    process then calls `run` with the same data and key (see core/sharding.py).
    callbacks: loggers called at every evaluation with the record written to metrics.jsonl
    (core/logging.py: CSVLogger, TensorBoardLogger, WandbLogger); a callback is a callable
    record -> None or an object with on_eval(record) and optional on_start(config, history) (the
    config and, on resume, the restored records) and close(); closed when the run ends or fails.
    accountant: privacy accounting added to every record, a callable rounds -> {name: float} or an
    object with such a `metrics` method (aggregators.privacy.Accountant: epsilon and delta). None: the
    algorithm's own if it aggregates with aggregators.dp_mean (aggregators/privacy.py), else none;
    False: none.
    """
    validate.positive("rounds", rounds, integer=True)
    validate.positive("eval_every", eval_every, integer=True)
    if checkpoint_every is not None:
        validate.positive("checkpoint_every", checkpoint_every, integer=True)
        if checkpoint_every % eval_every:
            raise ValueError(f"checkpoint_every={checkpoint_every} must be a multiple of "
                             f"eval_every={eval_every}")
        if out is None:
            raise ValueError("checkpoint_every needs out= (the directory to write checkpoints to)")
    if resume and out is None:
        raise ValueError("resume=True needs out= (the directory holding the checkpoints)")
    alg.check(data)
    accountant = _accountant(alg, data, accountant)
    callbacks = [_callback(cb) for cb in callbacks]
    if mesh is not None:
        sharding.check_mesh(mesh)
    key, key_repr = _as_key(key)
    k_init, k_rounds = jax.random.split(key)
    config = dict(alg.config, rounds=rounds, eval_every=eval_every, key=key_repr,
                  data=data_fingerprint(data), **(extra_config or {}))

    mgr = ckpt.manager(out) if (out is not None and (checkpoint_every or resume)) else None
    history: list = []
    start = 0
    state = init_state(alg, k_init, data)
    if resume:
        step = ckpt.latest_step(mgr)
        if step is None:
            raise FileNotFoundError(f"resume=True but there is no checkpoint in "
                                    f"{os.path.join(out, 'checkpoints')}")
        state, meta = ckpt.restore(mgr, step, state)
        diff = ckpt.config_diff(meta["config"], config)
        if diff:
            raise ValueError("cannot resume: the checkpoint was written by a different config:\n  "
                             + "\n  ".join(diff))
        start = int(step)
        history = _read_history(out, upto=start)
    if mesh is not None:
        state, data = sharding.place_state(state, mesh), sharding.replicate(data, mesh)
        k_rounds = sharding.replicate(k_rounds, mesh)
    if out is not None:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        _write_history(out, history)

    for cb in callbacks:
        cb.on_start(config, list(history))
    try:
        state, history = _train(alg, data, state, history, k_rounds, start=start, rounds=rounds,
                                eval_every=eval_every, out=out, mgr=mgr, config=config,
                                checkpoint_every=checkpoint_every, progress=progress, mesh=mesh,
                                callbacks=callbacks, accountant=accountant)
    finally:
        for cb in callbacks:
            cb.close()
    return RunResult(state=state, history=history)


def _train(alg, data, state, history, k_rounds, *, start, rounds, eval_every, out, mgr, config,
           checkpoint_every, progress, mesh, callbacks, accountant):
    adapt_data = alg.adapt_split(data) if getattr(alg, "adapt", None) is not None else None
    bar = _progress(rounds, start, progress)
    totals = {k: v for k, v in (history[-1] if history else {}).items() if k.startswith("total_")}
    t = start
    while t < rounds:
        length = min(eval_every, rounds - t)
        with sharding.use_mesh(mesh):
            state, per_round = run_rounds(alg, state, data, k_rounds, jnp.int32(t), length)
        per_round = jax.device_get(per_round)
        for name in sorted(per_round):          # local_loss, local_objective, personal_loss, ...
            if name.endswith(("_loss", "_objective")):
                _stop_if_not_finite(per_round, name, first_round=t)
        t += length
        with sharding.use_mesh(mesh):
            sums = evaluate(alg, state, data, adapt_data)
        record = eval_record(t, per_round, jax.device_get(sums), totals)
        if accountant is not None:
            record.update({k: float(v) for k, v in accountant(t).items()})
        for name in ("train_loss", "test_loss", "train_personal_loss", "test_personal_loss"):
            if name in record and not np.isfinite(record[name]):
                raise FloatingPointError(f"non-finite {name} ({record[name]}) at round {t}")
        history.append(record)
        if out is not None:
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        for cb in callbacks:
            cb.on_eval(record)
        if mgr is not None and checkpoint_every and (t % checkpoint_every == 0 or t == rounds):
            ckpt.save(mgr, t, state, {"config": config, "round": t})
        bar.update(length)
        bar.set_postfix({k: f"{record[k]:.4f}" for k in ("train_loss", "test_accuracy") if k in record})
    bar.close()
    return state, history


def eval_record(t: int, per_round: dict, sums: dict, totals: dict) -> dict:
    """The metrics.jsonl record after round t: evaluation metrics, per-round metrics averaged over
    the chunk, bytes_* summed into the running total_* entries (`totals` is updated in place)."""
    record = {"round": t, **evaluation_metrics(sums)}
    for name, values in per_round.items():
        values = np.asarray(values, np.float64)
        if name.startswith("bytes_") and not name.endswith("_per_client"):   # running totals
            totals[f"total_{name}"] = totals.get(f"total_{name}", 0.0) + float(values.sum())
        record[name] = float(values.mean())
    record.update(totals)
    return record


def _accountant(alg, data, accountant):
    if accountant is False:
        return None
    if accountant is None:
        # the aggregator knows its own privacy accounting (aggregators/privacy.py: DPMean)
        make = getattr(getattr(getattr(alg, "setup", None), "aggregator", None),
                       "make_accountant", None)
        acc = None if make is None else make(alg, data)
        return None if acc is None else acc.metrics
    fn = getattr(accountant, "metrics", accountant)
    if not callable(fn):
        raise ValueError(f"accountant must be a callable rounds -> {{name: float}}, an object with "
                         f"a metrics(rounds) method, None or False, got {type(accountant).__name__}")
    return fn


class _Callback:
    """A callback with all three hooks; those it lacks do nothing."""
    def __init__(self, cb):
        self.on_eval = getattr(cb, "on_eval", cb)
        self.on_start = getattr(cb, "on_start", lambda config, history: None)
        self.close = getattr(cb, "close", lambda: None)


def _callback(cb):
    if hasattr(cb, "on_eval") or callable(cb):
        return _Callback(cb)
    raise ValueError(f"callbacks: each must be a callable record -> None or an object with "
                     f"on_eval(record), got {type(cb).__name__}")


def _stop_if_not_finite(per_round: dict, name: str, *, first_round: int):
    if name not in per_round:
        return
    bad = np.flatnonzero(~np.isfinite(np.asarray(per_round[name])))
    if bad.size:
        r = first_round + int(bad[0]) + 1
        raise FloatingPointError(f"non-finite training loss ({name}) at round {r}; lower the "
                                 "learning rate or check the data")


def _read_history(out: str, *, upto: int) -> list:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["round"] <= upto]


def _write_history(out: str, history: list):
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for r in history:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, unit="round", leave=False)
