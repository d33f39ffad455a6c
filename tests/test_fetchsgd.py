"""FetchSGD and local top-k: rounds equal a plain per-client reference loop (numpy count sketch,
unjitted per-client SGD), bytes on the wire, the learning claim, and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lab as fl
from fedjax_lab import Setup, aggregators, models
from fedjax_lab.algorithms import ALGORITHMS
from fedjax_lab.algorithms.fetchsgd import fetchsgd
from fedjax_lab.algorithms.local_topk import local_topk
from fedjax_lab import uplink
from fedjax_lab.core.rounds import participate
from fedjax_lab.core.setup import Cohort, LocalWork, Optimizer
from fedjax_lab.core.tree import flatten
from fedjax_lab.core.types import batch_loss
from test_compression import NumpyCountSketch


_GRADS = {}


def batch_grad(model):
    """value_and_grad of one batch's loss, jitted once per model (only this leaf call is jitted)."""
    if model not in _GRADS:
        _GRADS[model] = jax.jit(jax.value_and_grad(
            lambda p, x, y, rng: batch_loss(model, p, x, y, rng, train=True)))
    return _GRADS[model]


def client_grads_reference(model, data, part, w, unravel, key, client_lr):
    """Per-client Python loop, no vmap: local SGD on each client's drawn batches."""
    grad = batch_grad(model)
    gs, losses = [], []
    for i, cid in enumerate(np.asarray(part.ids)):
        params = unravel(jnp.asarray(w))
        kc = jax.random.fold_in(key, int(cid))
        ls = []
        for s in range(part.batches.idx.shape[1]):
            if not bool(part.batches.step_mask[i, s]):
                continue
            rows = part.batches.idx[i, s]
            loss, g = grad(params, data.x[rows], data.y[rows], jax.random.fold_in(kc, s))
            params = jax.tree.map(lambda p, q: p - client_lr * q, params, g)
            ls.append(float(loss))
        gs.append((w - np.asarray(flatten(params)[0])) / client_lr)
        losses.append(np.mean(ls))
    return np.stack(gs), np.array(losses)


participate_jit = jax.jit(participate, static_argnums=(2, 3))   # shared sampler, tested elsewhere


def weights_reference(part, weighting, drop_stragglers=False):
    p = np.asarray(part.num_examples, np.float64) if weighting == "examples" \
        else np.ones(part.ids.shape[0])
    if drop_stragglers:
        p = np.where(np.asarray(part.is_straggler), 0.0, p)
    return p / p.sum()


def topk_reference(v, k):
    return np.argsort(-np.abs(v), kind="stable")[:k]


def fetchsgd_reference(model, data, key, rounds, *, lr, momentum, k, rows, cols, second_round=False,
                       num_candidates=0, masking="subtract", momentum_masking=True, local_steps=1,
                       client_lr=1.0, batch_size=4, clients_per_round=3, weighting="uniform",
                       per_client_sketch=True, lr_schedule="constant", stragglers=0.0,
                       drop_stragglers=False):
    """Algorithm 1 of the paper, written out with numpy arrays and loops."""
    k_init, k_rounds = jax.random.split(key)
    alg = fetchsgd(model, k=k, sketch_rows=rows, sketch_cols=cols,
                   setup=Setup.of(clients_per_round=clients_per_round))
    state = alg.init(k_init, data)                      # same initial params and hash seeds
    w, unravel = flatten(state.params)
    w = np.asarray(w)
    d = w.shape[0]
    ref = NumpyCountSketch(np.asarray(state.sketch.seeds), d, rows, cols)
    cohort = Cohort(clients_per_round, weighting=weighting)
    work = LocalWork(batch_size=batch_size, local_steps=local_steps, stragglers=stragglers)
    s_u, s_e = np.zeros((rows, cols)), np.zeros((rows, cols))
    m = num_candidates or k

    def remove(table, idx, vals):
        if masking == "subtract":
            dense = np.zeros(d)
            dense[idx] = vals
            return table - ref.sketch(dense)
        table = table.copy()
        for j in range(rows):
            table[j, ref.buckets[j, idx].astype(np.int64)] = 0.0
        return table

    senders = []
    for r in range(1, rounds + 1):
        k_part, k_train = jax.random.split(jax.random.fold_in(k_rounds, r))
        part = participate_jit(k_part, data, cohort, work)
        g, _ = client_grads_reference(model, data, part, w, unravel, k_train, client_lr)
        p = weights_reference(part, weighting, drop_stragglers)
        senders.append(int((p > 0).sum()))
        eta = lr / np.sqrt(r) if lr_schedule == "inv_sqrt" else lr     # eta_t at t = r - 1
        table = sum(p[i] * ref.sketch(g[i].astype(np.float64)) for i in range(g.shape[0]))
        s_u = momentum * s_u + table
        s_e = s_e + eta * s_u
        est = ref.estimate(s_e)
        if second_round:
            cand = topk_reference(est, m)
            vals = ref.estimate(s_e - eta * table)[cand] + eta * (p @ g)[cand]
            keep = topk_reference(vals, k)
            idx, delta = cand[keep], vals[keep]
        else:
            idx = topk_reference(est, k)
            delta = est[idx]
        s_e = remove(s_e, idx, delta)
        if momentum_masking:
            s_u = remove(s_u, idx, ref.estimate(s_u)[idx])
        w = w.copy()
        w[idx] -= delta.astype(np.float32)
    return w, s_u, s_e, senders


def run_rounds(alg, data, key, rounds):
    k_init, k_rounds = jax.random.split(key)
    state = alg.init(k_init, data)
    step = jax.jit(alg.round)
    metrics = [flatten(state.params)[0]]
    for r in range(1, rounds + 1):
        state, m = step(state, data, jax.random.fold_in(k_rounds, r))
        metrics.append(m)
    return state, metrics


CASES = {
    "paper": dict(),
    "second_round": dict(second_round=True, num_candidates=6),
    # + the server sketches sum_i p_i g_i once; the reference still sums per-client sketches
    "code_zero_cells_sketch_of_sum": dict(masking="zero_cells", per_client_sketch=False),
    "local_steps_examples_weights": dict(local_steps=3, client_lr=0.5, weighting="examples",
                                         momentum_masking=False),
    "inv_sqrt_server_lr": dict(lr_schedule="inv_sqrt"),
    # stragglers' partial gradients are kept by default; drop_stragglers=True weighs them 0
    "stragglers_kept": dict(local_steps=3, client_lr=0.5, stragglers=0.6),
    "stragglers_dropped": dict(local_steps=3, client_lr=0.5, stragglers=0.6, drop_stragglers=True),
}
# the reference's arguments that are Setup values, and their flat names
SHARED = dict(lr="server_lr", momentum="server_momentum", lr_schedule="server_lr_schedule",
              local_steps="local_steps", client_lr="client_lr", weighting="weighting",
              stragglers="stragglers", drop_stragglers="drop_stragglers")


def split_hyper(hyper, **fixed):
    """The reference's keywords -> (FetchSGD's own hyperparameters, Setup.of(...))."""
    own = {k: v for k, v in hyper.items() if k not in SHARED}
    own["sketch_rows"], own["sketch_cols"] = own.pop("rows"), own.pop("cols")
    return own, Setup.of(**fixed, **{SHARED[k]: v for k, v in hyper.items() if k in SHARED})


LOGISTIC = models.logistic(3)                      # d = 4 * 3 + 3 = 15, one model: one grad jit


@pytest.mark.parametrize("case", list(CASES))
def test_fetchsgd_rounds_equal_reference_loop(tiny_data, case):
    model = LOGISTIC
    hyper = dict(lr=0.5, momentum=0.9, k=3, rows=3, cols=5, **CASES[case])
    key = jax.random.key(7)
    w_ref, s_u_ref, s_e_ref, senders = fetchsgd_reference(model, tiny_data, key, 3, **hyper)
    own, setup = split_hyper(hyper, clients_per_round=3, batch_size=4)
    alg = fetchsgd(model, setup=setup, **own)
    state, (w0, *metrics) = run_rounds(alg, tiny_data, key, 3)
    np.testing.assert_allclose(np.asarray(flatten(state.params)[0]), w_ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.momentum), s_u_ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.error), s_e_ref, atol=1e-5)
    moved = np.asarray(flatten(state.params)[0]) != np.asarray(w0)
    assert 3 <= moved.sum() <= 9                    # at most k coordinates per round
    up = 3 * 5 * 4 + (4 * 6 if case == "second_round" else 0)
    assert float(metrics[0]["bytes_up"]) == senders[0] * up   # r x c float32 (+ k' floats) each
    assert senders[0] == 3 or case == "stragglers_dropped"
    for m in metrics:                     # no extra loss: the local objective is the data loss
        assert float(m["local_objective"]) == float(m["local_loss"])


# The learning claim (Rothchild et al. 2020, issue 6): on a small non-iid task FetchSGD with a sketch
# >= 10x smaller than the model gets within a margin of uncompressed momentum SGD at equal rounds and
# beats local top-k without error feedback (the paper's stateless-client baseline) at equal k.
# Setting: digits, 2 label shards per client (100 clients, 10 per round), MLP 64 (d = 4,810), one
# batch-20 gradient per client per round, lr 0.1, momentum 0.9, 500 rounds; FetchSGD: sketch 1 x 481
# (10x smaller than the model), k = 96, second round over 2k candidates, the code's zero-cells error
# feedback (the paper's subtraction diverges at this compression, see the module docstring); local
# top-k: k = 96 per client, no error feedback. Score: mean test accuracy over rounds 250, 300, ..., 500
# (six evaluations; three were too noisy). Measured, seed = data partition seed = run key:
#   seed   SGD-M   FetchSGD  top-k no EF   SGD-M - FetchSGD   FetchSGD - top-k no EF
#    0     0.981   0.958     0.932         0.023              0.026
#    1     0.976   0.958     0.935         0.018              0.023
#    2     0.961   0.946     0.916         0.015              0.030
#    3     0.981   0.969     0.936         0.012              0.033
#    4     0.972   0.959     0.902         0.013              0.058
# so the asserted margins (within 0.035 of SGD-M, >= 0.01 above top-k without EF) hold with >= 0.012
# room on every seed. Where the claim does NOT hold (measured, seeds 0-4, same task): at higher
# compression FetchSGD (zero-cells) collapses, sketch 1 x 240 (20x) or 1 x 120 (40x) with k = c/5:
# test accuracy 0.11-0.23 at round 500, while local top-k without EF at the same k reaches 0.82-0.94;
# 5 x 48 (20x), k = 24: 0.83-0.86 (seeds 0, 1); and at equal upload bytes (top-k k = r c / 2 = 240)
# local top-k without EF beats FetchSGD on this task (experiments/reproduce/fetchsgd.py, 1000
# rounds: 0.972 vs 0.947 without the second round).
CLAIM_SEEDS = (0, 1, 2, 3, 4)


def fetchsgd_claim_accuracies(seed):
    """Mean test accuracy over rounds 250-500 of SGD-M, FetchSGD and local top-k without EF."""
    data = fl.data.load("digits:shards=2,clients=100", seed=seed)
    model = models.mlp(10, hidden=(64,))
    common = dict(clients_per_round=10, batch_size=20, server_lr=0.1, server_momentum=0.9)
    algs = {
        "sgdm": fl.algorithms.fedopt(model, setup=Setup.of(client_lr=1.0, local_steps=1,
                                                           weighting="uniform", **common)),
        "fetchsgd": fetchsgd(model, k=96, sketch_rows=1, sketch_cols=481, masking="zero_cells",
                             second_round=True, num_candidates=192, setup=Setup.of(**common)),
        "topk_no_ef": local_topk(model, k=96, error_feedback=False, setup=Setup.of(**common)),
    }
    acc = {}
    for name, alg in algs.items():
        hist = fl.run(alg, data, rounds=500, key=seed, eval_every=50, progress=False).history
        acc[name] = float(np.mean([h["test_accuracy"] for h in hist if h["round"] >= 250]))
    d = sum(x.size for x in jax.tree.leaves(model.init(jax.random.key(0), data.x[:1])))
    assert d / (1 * 481) >= 10                       # the sketch is >= 10x smaller than the model
    return acc


def test_fetchsgd_learns_near_uncompressed_and_beats_local_topk_without_error_feedback():
    """Digits, 2 label shards per client (100 clients, 10 per round), MLP 64 (d = 4,810), lr 0.1,
    momentum 0.9, 500 rounds; FetchSGD sketch 1 x 481 (10x smaller than the model), k = 96, second
    round over 2k candidates, zero-cells masking; local top-k k = 96 without error feedback. Mean test
    accuracy over rounds 250-500, seed 0: SGD-M 0.981, FetchSGD 0.958, top-k no EF 0.932. Over seeds
    0-4 (slow test below): SGD-M - FetchSGD 0.012-0.023, FetchSGD - top-k no EF 0.023-0.058."""
    acc = fetchsgd_claim_accuracies(0)
    assert acc["fetchsgd"] >= acc["sgdm"] - 0.035, acc
    assert acc["fetchsgd"] >= acc["topk_no_ef"] + 0.01, acc


@pytest.mark.slow
def test_fetchsgd_learning_claim_holds_over_seeds():
    """The claim above on seeds 0-4 (numbers in the comment above CLAIM_SEEDS); about 1 min."""
    gaps = []
    for seed in CLAIM_SEEDS:
        acc = fetchsgd_claim_accuracies(seed)
        assert acc["fetchsgd"] >= acc["sgdm"] - 0.035, (seed, acc)
        assert acc["fetchsgd"] >= acc["topk_no_ef"] + 0.01, (seed, acc)
        gaps.append(acc["fetchsgd"] - acc["topk_no_ef"])
    assert np.mean(gaps) >= 0.025, gaps              # measured mean 0.034


def test_registered_in_algorithms():
    assert ALGORITHMS["fetchsgd"][0] is fetchsgd
    assert ALGORITHMS["local_topk"][0] is local_topk


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "k must be"),
    (dict(sketch_rows=0), "sketch_rows"),
    (dict(sketch_cols=1.5), "sketch_cols"),
    (dict(setup=Setup.of(server_momentum=1.0)), r"server_momentum must lie in \[0, 1\)"),
    (dict(masking="median"), "masking"),
    (dict(k=5, num_candidates=3), "num_candidates"),
    (dict(setup=Setup.of(server_optimizer="fedadam")), "server_opt must be .*sgd.*'fedadam'"),
    (dict(setup=Setup(client_opt=Optimizer.of(optax.sgd(0.1)))), "client_opt"),
])
def test_fetchsgd_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fetchsgd(models.logistic(3), **kwargs)


@pytest.mark.parametrize("factory", [fetchsgd, local_topk])
@pytest.mark.parametrize("setup, field", [
    (Setup(aggregator=aggregators.median()), "aggregator"),
    (Setup.of(attack="sign_flip"), "attack"),
    (Setup(uplink=uplink.sign()), "uplink"),
])
def test_sketch_is_the_uplink_no_aggregator_attack_or_uplink(factory, setup, field):
    with pytest.raises(ValueError, match=f"takes no Setup.{field}"):
        factory(models.logistic(3), setup=setup)


def test_check_rejects_k_above_model_size_and_too_many_clients(tiny_data):
    two = Setup.of(clients_per_round=2)
    with pytest.raises(ValueError, match="k=100 .*d=15"):
        fetchsgd(models.logistic(3), k=100, setup=two).check(tiny_data)
    with pytest.raises(ValueError, match="k=16 exceeds"):
        local_topk(models.logistic(3), k=16, setup=two).check(tiny_data)
    with pytest.raises(ValueError, match="clients_per_round"):
        fetchsgd(models.logistic(3), k=3, setup=Setup.of(clients_per_round=6)).check(tiny_data)
    with pytest.raises(ValueError, match="k must be"):
        local_topk(models.logistic(3), k=0)


def test_defaults_and_config_are_the_setup():
    """The old defaults (golden runs): server SGD lr 0.1 momentum 0.9, client lr 1, one step of
    batch 10, 10 clients averaged uniformly; config.json holds the flat names the CLI reads."""
    for factory in (fetchsgd, local_topk):
        alg = factory(models.logistic(3))
        s = alg.setup
        assert (s.server_opt.name, s.server_opt.lr, s.server_opt.momentum) == ("sgd", 0.1, 0.9)
        assert (s.client_opt.name, s.client_opt.lr) == ("sgd", 1.0)
        assert (s.work.local_steps, s.work.batch_size) == (1, 10)
        assert (s.cohort.clients_per_round, s.cohort.sampling, s.cohort.weighting) == \
            (10, "uniform", "uniform")
        assert alg.config["algorithm"] == factory.__name__
        assert alg.config["server_lr"] == 0.1 and alg.config["server_momentum"] == 0.9
        assert alg.config["k"] == 100 and "aggregator" not in alg.config
    assert fetchsgd(models.logistic(3), setup=Setup.of(server_lr=0.3)).config["server_lr"] == 0.3


# eta = server_lr traced under jax.vmap equals the separate runs: tests/test_conformance.py
# (the separate run at the defaults against the numpy reference of tests/references/fetchsgd.py).
