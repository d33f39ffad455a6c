"""The client axis sharded over devices (and hosts): same numbers as one device, really split.

Several CPU devices need XLA_FLAGS=--xla_force_host_platform_device_count set before jax is
imported, so the multi-device checks run this file as a subprocess (`python test_sharding.py
devices OUT`) that writes its measurements to OUT as JSON; the tests assert on them. The multi-host
test starts two such processes (`host` mode) joined by `jax.distributed.initialize` over gloo.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import Cohort, LocalWork, Setup, algorithms, models
from fedjax_lab.core import sharding
from fedjax_lab.core.driver import run, run_rounds
from fedjax_lab.core.rounds import participate
from fedjax_lab.data import synthetic

CASES = {  # name: (factory, clients_per_round, hyperparameters: own (mu) and Setup.of names)
    "fedavg_c8": ("fedavg", 8, dict(stragglers=0.5)),                  # 8 = 2 per device
    "fedprox_c6": ("fedprox", 6, dict(mu=0.5, stragglers=0.5, weighting="uniform")),  # padded to 8
}
COMMON = dict(client_lr=0.05, local_steps=4, batch_size=5)   # Setup.of names
OWN = {"mu"}                                                   # the factories' own keywords


_participate = jax.jit(participate, static_argnums=(2, 3))


def _data():
    return synthetic(1.0, 1.0, num_clients=12, dim=8, num_classes=10, seed=3, min_size=10, max_size=50)


def _alg(kind, C, extra, model):
    own = {k: v for k, v in extra.items() if k in OWN}
    shared = {k: v for k, v in extra.items() if k not in OWN}
    return getattr(algorithms, kind)(
        model, **own, setup=Setup.of(clients_per_round=C, **COMMON, **shared))


def _reference_round(data, params, key, *, C, mu=0.0, drop_stragglers, weighting, stragglers):
    """Plain per-client loop (numpy, no jit, no vmap) of one FedAvg/FedProx round, logistic model."""
    cohort = Cohort(clients_per_round=C, weighting=weighting)
    work = LocalWork(local_steps=COMMON["local_steps"], batch_size=COMMON["batch_size"],
                     stragglers=stragglers)
    k_part, _ = jax.random.split(key)
    part = _participate(k_part, data, cohort, work)           # no mesh: the C real clients
    W0 = np.asarray(params["Dense_0"]["kernel"], np.float64)
    b0 = np.asarray(params["Dense_0"]["bias"], np.float64)
    x, y = np.asarray(data.x, np.float64), np.asarray(data.y)
    idx, mask = np.asarray(part.batches.idx), np.asarray(part.batches.step_mask)
    sizes, strag = np.asarray(part.num_examples, np.float64), np.asarray(part.is_straggler)
    lr, dW, db, weights = COMMON["client_lr"], [], [], []
    for c in range(C):                                        # reference loop over clients
        W, b = W0.copy(), b0.copy()
        for s in np.flatnonzero(mask[c]):
            xb, yb = x[idx[c, s]], y[idx[c, s]]
            z = xb @ W + b
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(yb)), yb] -= 1
            W, b = (W - lr * (xb.T @ p / len(yb) + mu * (W - W0)),
                    b - lr * (p.mean(0) + mu * (b - b0)))
        dW.append(W - W0)
        db.append(b - b0)
        w = (sizes[c] if weighting == "examples" else 1.0) * (mask[c].sum() > 0)
        weights.append(0.0 if (drop_stragglers and strag[c]) else w)
    p = np.asarray(weights) / np.sum(weights)
    return W0 + np.tensordot(p, np.stack(dW), 1), b0 + np.tensordot(p, np.stack(db), 1)


def _maxdiff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---------------------------------------------------------------------------------------------
# Subprocess workers (run with several host devices)


def _hlo_facts(hlo, C):
    padded = sharding.padded_size(C, 4)
    return dict(num_partitions_4="num_partitions=4" in hlo, all_reduce=hlo.count("all-reduce("),
                per_device_client_params=f"f32[{padded // 4},8,10]" in hlo,
                full_client_params=f"f32[{C},8,10]" in hlo or f"f32[{padded},8,10]" in hlo)


def _worker_devices(out_path):
    """Measurements on 4 forced CPU devices: sharded vs unsharded vs reference loop, HLO facts.

    fedavg_c8 runs jitted rounds directly; fedprox_c6 (padded) runs through run(..., mesh=).
    """
    assert jax.device_count() == 4, jax.devices()
    data, mesh = _data(), sharding.client_mesh()
    data_m = sharding.replicate(data, mesh)
    model = models.logistic(data.num_classes)
    report = {"device_count": jax.device_count(), "cases": {}}

    kind, C, extra = CASES["fedavg_c8"]
    alg = _alg(kind, C, extra, model)
    state0 = alg.init(jax.random.key(0), data)
    rnd = jax.jit(alg.round)
    with jax.set_mesh(mesh):
        sharded = sharding.place_state(state0, mesh)
        compiled = rnd.lower(sharded, data_m, jax.random.key(0)).compile()
    plain, m_diff = state0, 0.0
    for t in range(2):
        key = jax.random.key(10 + t)
        plain, m_plain = rnd(plain, data, key)
        sharded, m_sharded = compiled(sharded, data_m, key)
        m_diff = max(m_diff, _maxdiff(m_plain, m_sharded))
    report["cases"]["fedavg_c8"] = dict(
        vs_unsharded=_maxdiff(plain.params, sharded.params), metrics_diff=m_diff,
        aggregated=float(m_sharded["clients_aggregated"]),
        expected_aggregated=float(m_plain["clients_aggregated"]),
        params_spec=str(sharded.params["Dense_0"]["kernel"].sharding.spec),
        **_hlo_facts(compiled.as_text(), C))

    # Padded (6 clients on 4 devices) through the driver: round r uses fold_in(k_rounds, r).
    kind, C, extra = CASES["fedprox_c6"]
    alg = _alg(kind, C, extra, model)
    res = run(alg, data, rounds=2, key=7, eval_every=2, progress=False, mesh=mesh)
    k_init, k_rounds = jax.random.split(jax.random.key(7))
    plain, rnd, ref_diff = alg.init(k_init, data), jax.jit(alg.round), 0.0
    for r in (1, 2):
        key = jax.random.fold_in(k_rounds, r)
        W, b = _reference_round(data, plain.params, key, C=C, mu=extra["mu"], drop_stragglers=False,
                                weighting=extra["weighting"], stragglers=extra["stragglers"])
        plain, m_plain = rnd(plain, data, key)
        ref_diff = max(ref_diff, _maxdiff(plain.params, {"Dense_0": {"kernel": W, "bias": b}}))
    with jax.set_mesh(mesh):   # the driver's program (already compiled by run: a cache hit)
        hlo = run_rounds.lower(alg, res.state, data_m, sharding.replicate(k_rounds, mesh),
                               jnp.int32(0), 2).compile().as_text()
    report["cases"]["fedprox_c6"] = dict(
        vs_unsharded=_maxdiff(plain.params, res.state.params),
        vs_reference=_maxdiff(res.state.params, {"Dense_0": {"kernel": W, "bias": b}}),
        plain_vs_reference=ref_diff,
        metrics_diff=max(abs(res.history[-1][k] - float(v)) for k, v in m_plain.items()
                         if not k.startswith("local")),
        aggregated=res.history[-1]["clients_aggregated"],
        expected_aggregated=float(m_plain["clients_aggregated"]),
        params_spec=str(res.state.params["Dense_0"]["kernel"].sharding.spec),
        history=res.history, **_hlo_facts(hlo, C))

    # The participation itself under the mesh: padded to 8, dummies last, sharded over 'clients'.
    cohort = Cohort(clients_per_round=6, weighting="uniform")                  # as in the ref.
    work = LocalWork(local_steps=COMMON["local_steps"], batch_size=COMMON["batch_size"],
                     stragglers=0.5)
    with jax.set_mesh(mesh):
        part = _participate(jax.random.key(5), data_m, cohort, work)
    plain_part = _participate(jax.random.key(5), data, cohort, work)
    report["participation"] = dict(
        ids=np.asarray(part.ids).tolist(), plain_ids=np.asarray(plain_part.ids).tolist(),
        valid=np.asarray(part.valid).tolist(),
        steps=np.asarray(part.batches.num_steps).tolist(),
        plain_steps=np.asarray(plain_part.batches.num_steps).tolist(),
        num_examples=np.asarray(part.num_examples).tolist(),
        plain_num_examples=np.asarray(plain_part.num_examples).tolist(),
        idx_spec=str(part.batches.idx.sharding.spec),
        idx_devices=len(part.batches.idx.sharding.device_set),
        idx_shard_shape=list(part.batches.idx.addressable_shards[0].data.shape))
    report["sweep"] = _sweep_facts(data, os.path.join(os.path.dirname(out_path), "sweep"))
    from fedjax_lab.core.local import map_pays_off   # the client-map rule on a multi-device CPU
    mlp = jax.eval_shape(models.mlp(10).init, jax.random.key(0), jnp.zeros((1, 784)))
    with jax.set_mesh(mesh):
        sharded = map_pays_off(mlp)
    report["map_rule"] = dict(unsharded=map_pays_off(mlp), sharded=sharded)
    with open(out_path, "w") as f:
        json.dump(report, f)


SWEEP = dict(grid={"mu": [0.0, 0.1, 1.0]}, seeds=[0, 1], rounds=4, eval_every=2, progress=False)


def _sweep_facts(data, out):
    """fl.sweep's runs over the 4 devices (6 runs padded to 8, 2 per device) against the same
    sweep on one device and against fl.run; a resume from its sharded checkpoint, on 4 devices
    and on one (the checkpoint holds the 6 runs, not the padding); the facts of
    its program: a shard_map over 'runs' with 2 runs per device, no loop over them, no
    collective."""
    from fedjax_lab import sweep
    from fedjax_lab.core import sweep as sw
    from tests.test_sweep_hlo import _eqns
    model = models.logistic(data.num_classes)
    setup = Setup.of(clients_per_round=3, stragglers=0.5, **COMMON)
    kw = dict(SWEEP, model=model, setup=setup)
    cached = sw.sharded_rounds._cache_size
    before = cached()
    one = sweep(algorithms.fedprox, data, devices=1, **kw)
    one_device_programs = cached() - before
    four = sweep(algorithms.fedprox, data, out=out, checkpoint_every=2, **kw)
    four_device_programs = cached() - before - one_device_programs
    resumed = sweep(algorithms.fedprox, data, out=out, checkpoint_every=2, resume=True, **kw)
    moved = out + "_moved"                   # 2 rounds on 4 devices (8 rows), 2 more on one (6)
    sweep(algorithms.fedprox, data, out=moved, checkpoint_every=2, **dict(kw, rounds=2))
    moved = sweep(algorithms.fedprox, data, out=moved, checkpoint_every=2, resume=True, devices=1,
                  **kw)
    ref = run(algorithms.fedprox(model, mu=1.0, setup=setup), data, rounds=4, key=1, eval_every=2,
              progress=False)                                  # run 5: mu = 1, seed 1
    rel = lambda a, b: max(abs(x[k] - y[k]) / max(abs(y[k]), 1e-6)
                           for x, y in zip(a, b) for k in y)

    program = sw.Program(factory=algorithms.fedprox, model=model, static=(), traced=("mu",),
                         kinds=(("mu", "factory"),), setup=setup)
    mesh = sw.runs_mesh(jax.devices())
    values = {"mu": jnp.linspace(0.0, 1.0, 8, dtype=jnp.float32)}
    keys = jnp.stack([jax.random.split(jax.random.key(s))[1] for s in range(8)])
    state = sw.sweep_init(program, values, data, keys)
    args = (program, mesh, values, state, data, None, keys, jnp.int32(0), 3)   # 3 rounds
    jaxpr = jax.make_jaxpr(sw.sharded_rounds.__wrapped__, static_argnums=(0, 1, 8))(*args).jaxpr
    maps = _eqns(jaxpr, {"shard_map"}, [])
    local = [e.params["jaxpr"].invars[0].aval.shape for e in maps]   # the values' local shape
    hlo = sw.sharded_rounds.lower(*args).compile().as_text()
    out_state = sw.sharded_rounds(*args)[0]
    leaf = jax.tree.leaves(out_state)[0]
    return dict(
        one_vs_four_params=max(_maxdiff(a.state.params, b.state.params)
                               for a, b in zip(one.runs, four.runs)),
        one_vs_four_history=max(rel(a.history, b.history) for a, b in zip(one.runs, four.runs)),
        resumed_params=max(_maxdiff(a.state.params, b.state.params)
                           for a, b in zip(four.runs, resumed.runs)),
        resumed_history=max(rel(a.history, b.history) for a, b in zip(four.runs, resumed.runs)),
        moved_params=max(_maxdiff(a.state.params, b.state.params)
                         for a, b in zip(one.runs, moved.runs)),
        moved_history=max(rel(a.history, b.history) for a, b in zip(one.runs, moved.runs)),
        run_vs_four_params=_maxdiff(ref.state.params, four.runs[5].state.params),
        run_vs_four_history=rel(four.runs[5].history, ref.history),
        result_devices=len(four.runs[0].state.params["Dense_0"]["kernel"].sharding.device_set),
        sharded_programs=[one_device_programs, four_device_programs],
        shard_maps=[dict(e.params["mesh"].shape) for e in maps], local_values_shapes=local,
        loops_over_runs=len([e for e in _eqns(jaxpr, {"scan", "while"}, [])
                             if e.params.get("length") in (2, 8)]),
        collectives=sum(hlo.count(op) for op in ("all-reduce", "all-gather", "all-to-all",
                                                 "collective-permute", "reduce-scatter")),
        state_spec=str(leaf.sharding.spec), state_devices=len(leaf.sharding.device_set),
        state_shard_rows=leaf.addressable_shards[0].data.shape[0])


def _worker_fedamp(out_path):
    """FedAMP / HeurFedAMP with neighbors="sampled", C = 3 padded to 4: the dummy (id N, whose
    gather clamps to row N - 1) must get no attention from the real clients."""
    data, mesh = _data(), sharding.client_mesh()
    data_m, model, out = sharding.replicate(data, mesh), models.logistic(data.num_classes), {}
    for attention in ("exp", "cosine"):
        alg = algorithms.fedamp(model, lam=0.5, alpha_k=0.2, sigma=2.0, attention=attention,
                                self_weight=0.4, neighbors="sampled",
                                setup=Setup.of(clients_per_round=3, **COMMON))
        state0 = alg.init(jax.random.key(0), data)
        noise = lambda x: 0.03 * jax.random.normal(jax.random.key(4), x.shape)   # distinct rows
        state0 = state0.replace(rows=jax.tree.map(lambda x: x + noise(x), state0.rows))
        rnd = jax.jit(alg.round)
        plain, sharded = state0, sharding.place_state(state0, mesh)
        m_diff = 0.0
        for t in range(2):
            key = jax.random.key(30 + t)
            plain, m_plain = rnd(plain, data, key)
            with jax.set_mesh(mesh):
                sharded, m_sharded = rnd(sharded, data_m, key)
            m_diff = max(m_diff, _maxdiff(m_plain, m_sharded))
        out[attention] = dict(rows_diff=_maxdiff(plain.rows, sharded.rows), metrics_diff=m_diff,
                              self_attention=float(m_plain["self_attention"]),
                              self_attention_sharded=float(m_sharded["self_attention"]))
    with open(out_path, "w") as f:
        json.dump(out, f)


def _worker_stateful(out_path):
    """Ditto's rows [N, ...] on 4 devices with padding: the dummy id N must not be written."""
    data, mesh = _data(), sharding.client_mesh()
    alg = algorithms.ditto(models.logistic(data.num_classes), lam=0.5,
                           setup=Setup.of(clients_per_round=6, **COMMON))
    state0 = alg.init(jax.random.key(0), data)
    rnd, key = jax.jit(alg.round), jax.random.key(20)
    plain, _ = rnd(state0, data, key)
    with jax.set_mesh(mesh):
        sharded, _ = rnd(sharding.place_state(state0, mesh), sharding.replicate(data, mesh), key)
    leaf = jax.tree.leaves(sharded.rows)[0]
    changed = np.asarray(leaf) != np.asarray(jax.tree.leaves(state0.rows)[0])
    with open(out_path, "w") as f:
        json.dump(dict(rows_diff=_maxdiff(plain.rows, sharded.rows),
                       server_diff=_maxdiff(plain.server.params, sharded.server.params),
                       rows_changed=int(np.sum(np.any(changed.reshape(12, -1), axis=1))),
                       rows_spec=str(leaf.sharding.spec),
                       rows_shard_shape=list(leaf.addressable_shards[0].data.shape)), f)


def _worker_host(out_path, port, process_id):
    """One of two processes (2 CPU devices each) running FedProx over a mesh of both."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=60)
    data, mesh = _data(), sharding.client_mesh()
    alg = _alg("fedprox", 6, dict(mu=0.5, stragglers=0.5), models.logistic(data.num_classes))
    res = run(alg, data, rounds=4, key=7, eval_every=2, progress=False, mesh=mesh)
    params = jax.tree.map(lambda x: np.asarray(x).tolist(), res.state.params)
    with open(out_path, "w") as f:
        json.dump(dict(process_count=jax.process_count(), device_count=jax.device_count(),
                       local_devices=jax.local_device_count(), history=res.history,
                       params=params), f)
    jax.distributed.shutdown()


def _env(devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    return env


# ---------------------------------------------------------------------------------------------
# Four devices in one process


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "devices.json"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "devices", str(out)],
                          env=_env(4), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_round_matches_unsharded(four_devices, case):
    r = four_devices["cases"][case]
    assert four_devices["device_count"] == 4
    assert r["vs_unsharded"] < 1e-5, r
    assert r["metrics_diff"] < 1e-5, r
    assert r["aggregated"] == r["expected_aggregated"]   # dummies never count
    assert r["params_spec"] == str(jax.sharding.PartitionSpec())   # server model replicated


def test_padded_sharded_run_matches_the_reference_loop(four_devices):
    r = four_devices["cases"]["fedprox_c6"]
    assert r["plain_vs_reference"] < 1e-5, r
    assert r["vs_reference"] < 1e-5, r
    assert r["aggregated"] == 6.0                       # 6 real clients, 2 zero-weight dummies
    assert r["history"][-1]["round"] == 2 and np.isfinite(r["history"][-1]["train_loss"])


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_round_is_partitioned_over_four_devices(four_devices, case):
    r = four_devices["cases"][case]
    assert r["num_partitions_4"]
    assert r["all_reduce"] >= 1                   # the weighted mean is a cross-device reduction
    assert r["per_device_client_params"]          # each device trains C/4 clients' params
    assert not r["full_client_params"]            # ... and no device holds all C of them


def test_padding_adds_zero_weight_dummies_and_keeps_the_real_clients(four_devices):
    p = four_devices["participation"]
    assert p["ids"][:6] == p["plain_ids"] and p["ids"][6:] == [12, 12]   # N = 12 is the dummy id
    assert p["valid"] == [True] * 6 + [False] * 2
    assert p["steps"][:6] == p["plain_steps"] and p["steps"][6:] == [0, 0]
    assert p["num_examples"] == p["plain_num_examples"] + [0, 0]
    assert p["idx_spec"] == str(jax.sharding.PartitionSpec("clients"))
    assert p["idx_devices"] == 4 and p["idx_shard_shape"] == [2, 4, 5]


def test_a_sweep_over_four_devices_gives_the_one_device_numbers_and_resumes(four_devices):
    """fl.sweep spreads its runs over the devices (issue 28): 6 runs on 4 devices, padded to 8."""
    r = four_devices["sweep"]
    assert r["one_vs_four_params"] < 1e-6 and r["one_vs_four_history"] < 1e-5, r
    assert r["run_vs_four_params"] < 1e-5 and r["run_vs_four_history"] < 1e-5, r   # fl.run's
    assert r["resumed_params"] == 0.0 and r["resumed_history"] == 0.0, r      # sharded checkpoint
    assert r["moved_params"] < 1e-6 and r["moved_history"] < 1e-5, r   # resumed on one device
    assert r["result_devices"] == 1                     # results land on one device, as fl.run's
    assert r["sharded_programs"] == [0, 1], r           # devices=1: none; default: all 4 devices


def test_the_sweep_program_splits_the_runs_over_the_devices_without_a_loop(four_devices):
    r = four_devices["sweep"]
    assert r["shard_maps"] == [{"runs": 4}] and r["local_values_shapes"] == [[2]], r
    assert r["loops_over_runs"] == 0, r                 # each device vmaps its 2 runs
    assert r["collectives"] == 0, r                     # runs are independent: no communication
    assert r["state_spec"] == str(jax.sharding.PartitionSpec("runs")), r
    assert r["state_devices"] == 4 and r["state_shard_rows"] == 2, r


def test_the_client_map_rule_asks_whether_the_client_axis_is_sharded(four_devices):
    """Large models map their clients on CPU unless the client axis is split over devices; four
    devices without a client mesh (fl.run on one of them, a sweep's runs) still map."""
    assert four_devices["map_rule"] == {"unsharded": True, "sharded": False}


def test_padded_fedamp_gives_the_dummy_no_attention(tmp_path):
    out = tmp_path / "fedamp.json"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "fedamp", str(out)],
                          env=_env(4), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for attention, r in json.load(open(out)).items():
        assert r["rows_diff"] < 1e-5, (attention, r)   # sharded (3 real + 1 dummy) == unsharded
        assert r["metrics_diff"] < 1e-5, (attention, r)
        assert 0.0 < r["self_attention"] < 0.95, (attention, r)   # the attention matters here


@pytest.mark.slow
def test_stateful_rows_are_sharded_and_dummy_rows_are_not_written(tmp_path):
    out = tmp_path / "stateful.json"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "stateful", str(out)],
                          env=_env(4), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    d = json.load(open(out))
    assert d["rows_diff"] < 1e-5 and d["server_diff"] < 1e-5
    assert d["rows_changed"] == 6                 # the 6 sampled rows moved; the dummy wrote nothing
    assert d["rows_spec"] == str(jax.sharding.PartitionSpec("clients"))
    assert d["rows_shard_shape"][0] == 3          # 12 rows over 4 devices


# ---------------------------------------------------------------------------------------------
# Two processes (multi-controller JAX over gloo)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    port = _free_port()
    outs = [tmp_path / f"host{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "host", str(outs[i]),
                               str(port), str(i)], env=_env(2), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        errs.append(err)
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errs)
    results = [json.load(open(o)) for o in outs]

    data = _data()
    alg = _alg("fedprox", 6, dict(mu=0.5, stragglers=0.5), models.logistic(data.num_classes))
    single = run(alg, data, rounds=4, key=7, eval_every=2, progress=False)
    for r in results:
        assert (r["process_count"], r["device_count"], r["local_devices"]) == (2, 4, 2)
        params = jax.tree.map(np.asarray, r["params"], is_leaf=lambda x: isinstance(x, list))
        same_shapes = jax.tree.map(np.shape, params) == jax.tree.map(np.shape, single.state.params)
        assert same_shapes and _maxdiff(params, single.state.params) < 1e-5
        for a, b in zip(r["history"], single.history):
            assert sorted(a) == sorted(b) and max(abs(a[k] - b[k]) for k in a) < 1e-5


# ---------------------------------------------------------------------------------------------
# One device, in process


def test_no_mesh_is_the_identity(synthetic_small):
    part = _participate(jax.random.key(0), synthetic_small, Cohort(clients_per_round=5),
                        LocalWork(local_steps=3, batch_size=4))
    assert sharding.num_client_shards() == 1 and sharding.padded_size(5) == 5
    assert part.ids.shape == (5,) and bool(jnp.all(part.valid))
    x = jnp.arange(6.0)
    assert sharding.shard_clients(x) is x


def test_pad_clients_fills_rows():
    tree = {"a": jnp.ones((3, 2)), "b": jnp.arange(3)}
    out = sharding.pad_clients(tree, 4, {"a": 0.0, "b": -1})
    np.testing.assert_array_equal(out["a"], np.vstack([np.ones((3, 2)), np.zeros((1, 2))]))
    np.testing.assert_array_equal(out["b"], [0, 1, 2, -1])
    assert sharding.padded_size(6, 4) == 8 and sharding.padded_size(8, 4) == 8
    with pytest.raises(ValueError, match="size=2"):
        sharding.pad_clients(tree, 2, {"a": 0.0, "b": 0})


def test_one_device_mesh_gives_the_same_round(synthetic_small):
    alg = algorithms.fedavg(models.logistic(synthetic_small.num_classes),
                            setup=Setup.of(clients_per_round=3, local_steps=3, batch_size=5))
    state, key, mesh = alg.init(jax.random.key(0), synthetic_small), jax.random.key(1), \
        sharding.client_mesh(jax.devices()[:1])
    rnd = jax.jit(alg.round)
    a, m_a = rnd(state, synthetic_small, key)
    with sharding.use_mesh(mesh):
        b, m_b = rnd(sharding.place_state(state, mesh), sharding.replicate(synthetic_small, mesh), key)
    assert _maxdiff(a.params, b.params) == 0.0 and _maxdiff(m_a, m_b) == 0.0   # bit-identical
    assert jax.tree.leaves(b.params)[0].sharding.mesh.shape == {"clients": 1}


def test_bad_mesh_fails_with_a_clear_message(synthetic_small):
    alg = algorithms.fedavg(models.logistic(synthetic_small.num_classes),
                            setup=Setup.of(clients_per_round=3))
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
        run(alg, synthetic_small, rounds=1, key=0, mesh="gpu", progress=False)
    other = jax.make_mesh((1,), ("batch",))
    with pytest.raises(ValueError, match="mesh must have an axis named 'clients'"):
        run(alg, synthetic_small, rounds=1, key=0, mesh=other, progress=False)
    explicit = jax.make_mesh((1,), ("clients",), axis_types=(jax.sharding.AxisType.Explicit,))
    with pytest.raises(ValueError, match="'clients' axis must be AxisType.Auto"):
        run(alg, synthetic_small, rounds=1, key=0, mesh=explicit, progress=False)
    with pytest.raises(ValueError, match="devices must be a non-empty list"):
        sharding.client_mesh([])


if __name__ == "__main__":
    if sys.argv[1] == "devices":
        _worker_devices(sys.argv[2])
    elif sys.argv[1] == "stateful":
        _worker_stateful(sys.argv[2])
    elif sys.argv[1] == "fedamp":
        _worker_fedamp(sys.argv[2])
    else:
        _worker_host(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
