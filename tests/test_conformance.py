"""Every registered algorithm (`fedjax_lab.algorithms.ALGORITHMS`, what `fedjax-lab list` shows),
with its default hyperparameters, the tiny shared setting of tests/references/__init__.py and the
logistic model, is checked for:

  * one round equal to its independent per-client reference loop (tests/references/<family>.py);
  * the same key giving a bit-identical state;
  * `fl.run` -> checkpoint -> resume equal to the uninterrupted run (metrics.jsonl and state);
  * its config.json parsed by `fedjax-lab run --config` into the same data, key, config and round
    program (and, in `make test-slow`, re-running it exactly: metrics.jsonl line by line);
  * `jax.vmap` over its traced float hyperparameters equal to the separate runs;
  * each hyperparameter's bad value rejected with a ValueError naming it, before compiling;
  * byte (and, where reported, FLOP) accounting in its metrics.

A new algorithm gets all of them by registering in ALGORITHMS and adding its reference. The work
per algorithm is shared: one `fl.run` program (rounds of one, eval_every=1) serves the reference,
determinism, resume, config and accounting checks (`case`, cached per algorithm), and the vmap
check is one more program; the CLI re-run compiles its own. tests/conftest.py orders the items
algorithm by algorithm, so under `make test` (xdist worksteal) one worker mostly runs an algorithm's
checks and shares that cache.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import typing

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lab
from fedjax_lab import Setup, cli, models
from fedjax_lab.algorithms import ALGORITHMS
from fedjax_lab.core import driver
from fedjax_lab.data import load
from tests.conftest import count_compiles
from tests.references import ATOL, MODEL, REFERENCES, RTOL, SETUP, TINY_DATASET, TINY_SETUP

NAMES = sorted(ALGORITHMS)
ROUNDS = 2
# A registered name without a reference fails, naming it (issue 24: an expected failure while the
# engineers adding algorithms landed theirs; every one of the 39 names had one by 20:30 UTC).
MISSING_REFERENCE_IS_XFAIL = False

# Library bugs this suite finds, as {(check, name): reason}: a strict xfail, so that the fix turns the
# check green and its entry must go. Empty: the five it found (pFedHN's zero-size state arrays that
# orbax would not checkpoint; record-only keys in FedGKT's, FedGen's and FedProto's config.json,
# now under "derived") are fixed.
KNOWN_BUGS: dict = {}


def known_bug(check, name):
    reason = KNOWN_BUGS.get((check, name))
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


def names_for(check):
    return [pytest.param(n, marks=known_bug(check, n)) for n in NAMES]


@functools.lru_cache(maxsize=None)
def tiny_data():
    return load(TINY_DATASET, seed=0)


def setup_flags(name) -> dict:
    """TINY_SETUP (+ the reference module's SETUP) restricted to the Setup names the algorithm uses."""
    used = {flag for flag, _, _ in cli.setup_params(ALGORITHMS[name][0])}
    return {k: v for k, v in {**TINY_SETUP, **SETUP.get(name, {})}.items() if k in used}


def model_name(name) -> str:
    return MODEL.get(name, "logistic")


def build(name, **hparams):
    data = tiny_data()
    model = models.get(model_name(name), data.num_classes, data.x[:1])
    return ALGORITHMS[name][0](model, setup=Setup.of(**setup_flags(name)), **hparams)


def params_of(alg, state):
    """{"global": ..., "clients": ...} of a state, as the reference contract names them."""
    out = {"clients": alg.client_params(state, jnp.arange(tiny_data().num_clients))}
    if alg.global_params is not None:
        out["global"] = alg.global_params(state)
    return out


_params_program = jax.jit(params_of, static_argnums=0)


def host_params(alg, state):
    """params_of as numpy, one program per algorithm (run eagerly, each leaf compiles its own)."""
    return jax.device_get(_params_program(alg, state))


def _lines(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return f.read().splitlines()


@dataclasses.dataclass
class Case:
    """One algorithm's shared runs, all with the same Algorithm instance, hence one compiled
    program: `full` (ROUNDS rounds, written to dir/full), `again` (the same key), `one` (the
    params after round 1, what the reference predicts)."""
    name: str
    alg: typing.Any
    dir: str
    full: typing.Any
    again: typing.Any
    one: dict


_CASES: dict = {}


def run_kwargs(name):
    return dict(key=0, eval_every=1, progress=False,
                extra_config=dict(dataset=TINY_DATASET, model=model_name(name), seed=0))


def case(name, tmp_path_factory) -> Case:
    if name not in _CASES:
        alg = build(name)
        data = tiny_data()
        d = str(tmp_path_factory.mktemp(f"conformance_{name}"))
        common = run_kwargs(name)
        full = fedjax_lab.run(alg, data, rounds=ROUNDS, out=os.path.join(d, "full"), **common)
        again = fedjax_lab.run(alg, data, rounds=ROUNDS, **common)
        one = fedjax_lab.run(alg, data, rounds=1, **common)
        _CASES[name] = Case(name, alg, d, full, again,
                            host_params(alg, one.state))
    return _CASES[name]


@pytest.mark.parametrize("name", NAMES)
def test_one_round_equals_its_reference_loop(name, tmp_path_factory):
    if name not in REFERENCES:
        msg = (f"{name!r} is registered in fedjax_lab.algorithms.ALGORITHMS but has no reference: "
               f"add REFERENCE = {{{name!r}: fn}} in tests/references/<family>.py (contract in "
               f"tests/references/__init__.py)")
        if MISSING_REFERENCE_IS_XFAIL:
            pytest.xfail(msg)
        pytest.fail(msg)
    c = case(name, tmp_path_factory)
    data = tiny_data()
    k_init, k_rounds = jax.random.split(jax.random.key(0))
    state0 = driver.init_state(c.alg, k_init, data)       # fl.run's alg.init(k_init, data)
    want = REFERENCES[name](c.alg, data, state0, jax.random.fold_in(k_rounds, 1))
    assert set(want) & {"global", "clients"}, f"{name}: the reference returned neither global nor clients"
    rtol, atol = want.get("rtol", RTOL), want.get("atol", ATOL)
    for part in ("global", "clients"):
        if part not in want:
            continue
        assert part in c.one, f"{name}: the reference gives {part!r} params but the algorithm has none"
        got_leaves, got_tree = jax.tree.flatten(c.one[part])
        want_leaves, want_tree = jax.tree.flatten(want[part])
        assert got_tree == want_tree, f"{name} {part}: structure {got_tree} != reference {want_tree}"
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(want[part])[0]]
        moved = 0.0
        for path, g, w, w0 in zip(paths, got_leaves, want_leaves,
                                  jax.tree.leaves(host_params(c.alg, state0)[part])):
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"{name} {part}{path}")
            moved = max(moved, float(np.abs(np.asarray(w0, np.float64) - w).max()))
        assert moved > 10 * atol, f"{name} {part}: the round did not move the params ({moved})"


@pytest.mark.parametrize("name", NAMES)
def test_same_key_gives_a_bit_identical_state(name, tmp_path_factory):
    c = case(name, tmp_path_factory)
    chex.assert_trees_all_equal(c.full.state, c.again.state, custom_message=f"{name}: two runs with key 0")
    assert c.full.history == c.again.history


@pytest.mark.parametrize("name", names_for("resume"))
def test_checkpoint_then_resume_equals_the_uninterrupted_run(name, tmp_path_factory):
    c = case(name, tmp_path_factory)
    cut = os.path.join(c.dir, "cut")
    common = dict(run_kwargs(name), out=cut, checkpoint_every=1)
    fedjax_lab.run(c.alg, tiny_data(), rounds=1, **common)            # interrupted after round 1
    resumed = fedjax_lab.run(c.alg, tiny_data(), rounds=ROUNDS, resume=True, **common)
    assert [h["round"] for h in resumed.history] == list(range(1, ROUNDS + 1))
    assert _lines(cut) == _lines(os.path.join(c.dir, "full"))
    chex.assert_trees_all_equal(resumed.state, c.full.state,
                                custom_message=f"{name}: resumed vs uninterrupted state")


@pytest.mark.parametrize("name", names_for("config"))
def test_config_json_rebuilds_the_same_run_through_the_cli(name, tmp_path_factory):
    """`fedjax-lab run --config config.json` parses it (no unknown key) into the same run: the same
    data (fingerprint), key, rounds, evaluation period and algorithm config, and the same one-round
    program (its jaxpr and constants: traced, neither lowered nor compiled). The slow test below re-runs every
    algorithm through the CLI and compares metrics.jsonl line by line."""
    c = case(name, tmp_path_factory)
    path = os.path.join(c.dir, "full", "config.json")
    with open(path) as f:
        saved = json.load(f)
    factory, _, args, hparams, flat = cli._parse(["--config", path])
    alg, data = cli.build_run(factory, args, hparams, flat)
    assert driver.data_fingerprint(data) == saved["data"]
    assert (args.seed, args.rounds, args.eval_every) == (saved["key"], saved["rounds"], saved["eval_every"])
    assert alg.config == c.alg.config
    k_init, key = jax.random.split(jax.random.key(0))

    def one_round(a):
        state = jax.eval_shape(a.init, k_init, data)
        closed = jax.make_jaxpr(a.round)(state, data, key)
        return str(closed.jaxpr), jax.device_get(closed.consts)
    (program, consts), (want, want_consts) = one_round(alg), one_round(c.alg)
    assert program == want, f"{name}: the CLI built another round program"
    assert len(consts) == len(want_consts)
    for a, b in zip(consts, want_consts):
        np.testing.assert_array_equal(a, b, err_msg=f"{name}: a constant of the round program differs")


@pytest.mark.slow
@pytest.mark.parametrize("name", names_for("config"))
def test_config_json_reruns_it_exactly_through_the_cli(name, tmp_path_factory):
    c = case(name, tmp_path_factory)
    config = os.path.join(c.dir, "full", "config.json")
    with open(config) as f:
        assert json.load(f)["algorithm"] == name
    out = os.path.join(c.dir, "cli")
    assert cli.main(["run", "--config", config, "--out", out, "--no-progress"]) == 0
    assert _lines(out) == _lines(os.path.join(c.dir, "full"))


# ---------------------------------------------------------------------------------------------
# Hyperparameters: the factory's own keywords (what `fedjax-lab run ALG --help` lists first)


SETUP_FLOATS = ("client_lr", "server_lr")


def own_floats(name):
    """The factory's own float hyperparameters with a numeric default, then the Setup's learning
    rates it uses (traced through Setup.of, as fl.sweep traces them)."""
    factory = ALGORITHMS[name][0]
    own = [(p, default) for p, typ, default in cli.own_params(factory)
           if typ is float and isinstance(default, (int, float)) and not isinstance(default, bool)]
    lrs = [(p, default) for p, _, default in cli.setup_params(factory)
           if p in SETUP_FLOATS and isinstance(default, (int, float))]
    return own + lrs


def _other(default, i):
    """A second value, scaled differently per hyperparameter (a common factor can cancel in a
    ratio such as FedAMP's lam / alpha_k)."""
    return (0.5 + 0.07 * i) * default if default else 0.25


def build_traced(name, values):
    """build(name) with some hyperparameters (own keywords or Setup lrs) given as traced values."""
    own = {p: v for p, v in values.items() if p not in SETUP_FLOATS}
    lrs = {p: v for p, v in values.items() if p in SETUP_FLOATS}
    data = tiny_data()
    model = models.get(model_name(name), data.num_classes, data.x[:1])
    return ALGORITHMS[name][0](model, setup=Setup.of(**setup_flags(name), **lrs), **own)


def _traced_floats(name):
    """The float hyperparameters the algorithm accepts as traced values, one at a time (found by
    tracing one round abstractly, no compilation); the others it needs as Python numbers (it says
    so by failing)."""
    data = tiny_data()
    k_init, key = jax.random.split(jax.random.key(0))

    def traces(floats):
        def one(values):
            alg = build_traced(name, dict(zip([p for p, _ in floats], values)))
            return alg.round(alg.init(k_init, data), data, key)[0]
        try:
            jax.eval_shape(one, [jnp.float32(d) for _, d in floats])
        except Exception:   # noqa: BLE001 - a static float: any tracer error
            return False
        return True
    return [f for f in own_floats(name) if traces([f])]


def _vmapped_round(name, floats):
    """(names, rows, program): round 1 of `name` from its init, vmapped over rows of the traced
    `floats` (row 0 their defaults, row 1 other values), returning params_of."""
    data = tiny_data()
    k_init, k_rounds = jax.random.split(jax.random.key(0))
    names = [p for p, _ in floats]
    rows = jnp.asarray([[d for _, d in floats], [_other(d, i) for i, (_, d) in enumerate(floats)]],
                       jnp.float32)

    def one_round(values):
        alg = build_traced(name, dict(zip(names, values)))
        state = alg.init(k_init, data)
        state, _ = alg.round(state, data, jax.random.fold_in(k_rounds, 1))
        return params_of(alg, state)
    return names, rows, jax.jit(jax.vmap(one_round))


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_traced_float_hyperparameters_equals_the_separate_runs(name, tmp_path_factory):
    """Round 1 vmapped over two settings of every traced float: row 0 (the defaults) equals the
    separate run (round 1 of the suite's fl.run, compiled on its own with Python floats); row 1
    equals the same program run on row 1 alone (each row its own run, no crosstalk). All the
    float hyperparameters are traced at once when the algorithm takes them so (one trace), else
    those it takes traced one at a time."""
    floats = own_floats(name)
    if not floats:
        pytest.skip(f"{name} has no float hyperparameter")
    try:
        names, rows, program = _vmapped_round(name, floats)
        batched = program(rows)
    except Exception:   # noqa: BLE001 - a static float among them: any tracer error
        floats = _traced_floats(name)
        if not floats:
            pytest.skip(f"{name} has no float hyperparameter that can be traced")
        names, rows, program = _vmapped_round(name, floats)
        batched = program(rows)
    c = case(name, tmp_path_factory)
    # the same program: no compilation; compared on the host (eager slicing compiles per leaf)
    batched, alone = jax.device_get((batched, program(jnp.stack([rows[1], rows[1]]))))
    # float tolerance: a batched matmul / convolution may sum in another order
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[0], batched), c.one, rtol=1e-4, atol=1e-5,
                                custom_message=f"{name} {names}: defaults vs fl.run")
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[1], batched), jax.tree.map(lambda a: a[0], alone),
                                rtol=1e-4, atol=1e-5, custom_message=f"{name} {names}: {rows[1]} vs alone")
    # the traced values are used: the two rows differ (not each hyperparameter need matter in
    # round 1, e.g. FedProto's lam before any prototype exists; the learning rates do)
    diff = jax.tree.leaves(jax.tree.map(lambda a: float(np.abs(a[0] - a[1]).max()), batched))
    assert max(diff) > 0, f"{name}: changing {names} changed nothing"


def _bad_values(name):
    """(hyperparameter, bad value) for each of the factory's own scalar keywords: NaN for a float,
    -1 for an int, an unknown name for a string. Bools and objects (models, solvers) have none."""
    out = []
    for p, typ, default in cli.own_params(ALGORITHMS[name][0]):
        if typ is float:
            out.append((p, math.nan))
        elif typ is int and not p.endswith("seed"):        # any int is a seed
            out.append((p, -1))
        elif typ is str:
            out.append((p, "no_such_option"))
    return out


BAD = [(name, p, v) for name in NAMES for p, v in _bad_values(name)]


@pytest.mark.parametrize("name, param, value", BAD, ids=[f"{n}-{p}" for n, p, _ in BAD])
def test_a_bad_hyperparameter_fails_naming_it_before_compiling(name, param, value):
    data = tiny_data()
    model = models.get(model_name(name), data.num_classes, data.x[:1])   # may compile its init
    with count_compiles() as compiles:
        with pytest.raises(ValueError, match=param):
            alg = ALGORITHMS[name][0](model, setup=Setup.of(**setup_flags(name)), **{param: value})
            alg.check(data)
            alg.init(jax.random.key(0), data)
    assert not compiles, f"{name}: {param}={value!r} compiled {len(compiles)} program(s) first"


@pytest.mark.parametrize("name", NAMES)
def test_metrics_account_bytes_and_flops(name, tmp_path_factory):
    c = case(name, tmp_path_factory)
    for rec in c.full.history:
        for key in ("bytes_up", "bytes_down", "bytes_up_per_client", "bytes_down_per_client"):
            assert key in rec, f"{name}: {key} missing from the metrics"
            assert np.isfinite(rec[key]) and rec[key] >= 0, f"{name}: {key} = {rec[key]}"
        assert rec["bytes_up"] >= rec["bytes_up_per_client"]
        assert rec["bytes_down"] >= rec["bytes_down_per_client"]
        for key in (k for k in rec if "flop" in k):
            assert np.isfinite(rec[key]) and rec[key] >= 0, f"{name}: {key} = {rec[key]}"
    last = c.full.history[-1]
    assert last["total_bytes_up"] > 0 and last["total_bytes_down"] > 0
    assert last["total_bytes_up"] == pytest.approx(sum(h["bytes_up"] for h in c.full.history))
    assert last["total_bytes_down"] == pytest.approx(sum(h["bytes_down"] for h in c.full.history))
