"""Ditto: closed form on federated mean estimation; one round against a per-client loop (default
batches, personal_steps with stragglers, attacks, the median aggregator under attack, a FedAdam
global solver); traced lam / personal_lr; robustness to label-flipping attackers, new-client
evaluation, the CLI, bad input."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab import Optimizer, Setup, cli
from fedjax_lab import data as D
from fedjax_lab import models, run
from fedjax_lab.algorithms.ditto import ditto
from fedjax_lab.algorithms.fedprox import fedprox
from fedjax_lab.attacks import flip_labels, malicious_clients
from fedjax_lab.core import driver, evaluate
from fedjax_lab.core.batching import draw_batches
from fedjax_lab.core.client_state import ClientRows
from fedjax_lab.core.rounds import participate
from tests.references.ditto import ditto_reference, xent  # noqa: F401


def mean_data(num_clients=5, per_client=4, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2, (num_clients, dim))
    xs = [c + rng.normal(0, 0.5, (per_client, dim)) for c in centers]
    ys = [np.zeros(per_client, np.int32) for _ in xs]
    return D.from_client_lists(xs, ys, test_xs=xs, test_ys=ys, num_classes=1), \
        np.stack([x.mean(0) for x in xs])


def run_rounds(alg, d, rounds, seed=0):
    state = jax.jit(alg.init)(jax.random.key(seed), d)
    return driver.run_rounds(alg, state, d, jax.random.key(seed + 1), jnp.int32(0), rounds)[0]


def test_mean_estimation_closed_form():
    # F_k(v) = 1/2 ||v - c_k||^2 (full-batch steps) => v_k* = (c_k + lam w*) / (1 + lam), w* = mean c_k
    d, c = mean_data()
    lam = 0.5
    alg = ditto(models.quadratic(3), lam=lam, setup=Setup.of(
        client_lr=0.1, clients_per_round=5, local_steps=5, batch_size=4, weighting="uniform",
        shuffle="epoch"))
    state = run_rounds(alg, d, 150)
    w_star = c.mean(0)
    np.testing.assert_allclose(alg.global_params(state)["x"], w_star, atol=1e-4)
    v = alg.client_params(state, jnp.arange(5))["x"]
    np.testing.assert_allclose(v, (c + lam * w_star) / (1 + lam), atol=1e-4)
    # and it is not simply the local optimum or the global model
    assert np.abs(np.asarray(v) - c).max() > 0.1
    assert np.abs(np.asarray(v) - w_star).max() > 0.1


def test_new_client_adaptation_closed_form():
    # a client that adapts w with Ditto's objective reaches (c_k + lam w) / (1 + lam)
    d, c = mean_data(num_clients=3, seed=1)
    w = {"x": jnp.array([1.0, -1.0, 0.5])}
    lam = 2.0
    adapt = evaluate.adapted_client_params(models.quadratic(3), optax.sgd(0.1), d, steps=200,
                                           batch_size=4, lam=lam)
    v = jax.jit(adapt)((w, jax.random.key(0)), jnp.arange(3))["x"]
    np.testing.assert_allclose(v, (c + lam * np.asarray(w["x"])) / (1 + lam), atol=1e-4)
    l, correct, n = jax.jit(lambda w, d, k: evaluate.adapted_sums(
        models.quadratic(3), optax.sgd(0.1), w, d, k, steps=200, batch_size=4, lam=lam))(
            w, d, jax.random.key(0))
    ref = [0.5 * np.sum((np.asarray(v[k]) - np.asarray(d.test.client(k)[0])) ** 2) for k in range(3)]
    np.testing.assert_allclose(l, ref, rtol=1e-4)


def perturbed_rows(state):
    # personal rows that differ from w_0, so the rows really are per client
    rows = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(5), x.shape), state.rows)
    return ClientRows(server=state.server, rows=rows)


def assert_round_matches(state, new, metrics, ref, ids, num_clients):
    V, Vb, W, b, ref_metrics = ref
    np.testing.assert_allclose(new.rows["Dense_0"]["kernel"], V, atol=1e-5)
    np.testing.assert_allclose(new.rows["Dense_0"]["bias"], Vb, atol=1e-5)
    np.testing.assert_allclose(new.server.params["Dense_0"]["kernel"], W, atol=1e-5)
    np.testing.assert_allclose(new.server.params["Dense_0"]["bias"], b, atol=1e-5)
    # the rows of the clients that were not sampled are untouched, bit for bit
    others = np.setdiff1d(np.arange(num_clients), np.asarray(ids))
    np.testing.assert_array_equal(np.asarray(new.rows["Dense_0"]["kernel"])[others],
                                  np.asarray(state.rows["Dense_0"]["kernel"])[others])
    for name, value in ref_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)


def round_and_participation(alg, d, key=jax.random.key(11)):
    """One jitted round of `alg` from perturbed rows, and the same participation (ids, batches,
    stragglers) as the round draws: Ditto's key is split into (k_part, k_train, k_pers)."""
    state = perturbed_rows(jax.jit(alg.init)(jax.random.key(0), d))
    new, metrics = jax.jit(alg.round)(state, d, key)
    part = jax.jit(participate, static_argnums=(2, 3))(
        jax.random.split(key, 3)[0], d, alg.setup.cohort, alg.setup.work)
    return state, new, metrics, part


def test_one_round_matches_per_client_loop():
    d = D.synthetic(1, 1, num_clients=6, seed=3, max_size=30, min_size=8)
    lam, mu, lr, plr = 0.3, 0.05, 0.05, 0.02
    alg = ditto(models.logistic(10), lam=lam, personal_lr=plr,
                global_solver=functools.partial(fedprox, mu=mu),
                setup=Setup.of(client_lr=lr, clients_per_round=3, local_steps=4, batch_size=5))
    state, new, metrics, part = round_and_participation(alg, d)
    ref = ditto_reference(d, state, part, lam=lam, mu=mu, lr=lr, plr=plr)
    assert_round_matches(state, new, metrics, ref, part.ids, 6)


@pytest.mark.parametrize("drop_stragglers", [True, False])
def test_personal_steps_with_stragglers_matches_per_client_loop(drop_stragglers):
    # personal_steps=s: s personal steps on their own batches; a straggler doing q of its L global
    # steps does ceil(s q / L) of them (issue 10 item 8: it used to do all s)
    d = D.synthetic(1, 1, num_clients=6, seed=3, max_size=30, min_size=8)
    L, s = 4, 6
    lam, lr, plr = 0.3, 0.05, 0.02
    alg = ditto(models.logistic(10), lam=lam, personal_lr=plr, personal_steps=s,
                setup=Setup.of(client_lr=lr, clients_per_round=4, local_steps=L, batch_size=5,
                               stragglers=0.5, drop_stragglers=drop_stragglers))
    key = jax.random.key(11)
    state, new, metrics, part = round_and_participation(alg, d, key)
    pb = draw_batches(jax.random.split(key, 3)[2], d, part.ids, batch_size=5, local_steps=s)
    q = np.asarray(part.batches.num_steps)
    straggler = np.asarray(part.is_straggler)
    p_steps = np.where(straggler, -(-s * q // L), s)          # ceil(s q / L); s for the others
    p_mask = np.arange(s)[None, :] < p_steps[:, None]
    assert (p_steps[straggler] < s).any()                     # some straggler's work is cut
    ref = ditto_reference(d, state, part, lam=lam, mu=0.0, lr=lr, plr=plr,
                          drop_stragglers=drop_stragglers, p_idx=pb.idx, p_mask=p_mask)
    assert_round_matches(state, new, metrics, ref, part.ids, 6)


@pytest.mark.parametrize("attack, scale", [("sign_flip", 2.0), ("label_flip", None)])
def test_attacks_inside_ditto_match_per_client_loop(attack, scale):
    # attackers corrupt their global update (sign_flip: -scale (w_k - w_t)) or train on flipped
    # labels; benign clients' personal models are those of the clean round (they see the attack
    # only through w_t, which is fixed within a round)
    d = D.synthetic(1, 1, num_clients=6, seed=3, max_size=30, min_size=8)
    lam, mu, lr, plr = 0.3, 0.05, 0.05, 0.02
    alg = ditto(models.logistic(10), lam=lam, personal_lr=plr, global_solver=f"fedprox:mu={mu}",
                setup=Setup.of(client_lr=lr, clients_per_round=4, local_steps=3, batch_size=5,
                               attack=attack, attack_fraction=0.5, attack_scale=scale,
                               attack_seed=1))
    state, new, metrics, part = round_and_participation(alg, d)
    malicious = np.asarray(malicious_clients(6, 0.5, seed=1))
    ids = np.asarray(part.ids)
    assert malicious[ids].any() and (~malicious[ids]).any()   # both kinds take part
    args = dict(lam=lam, mu=mu, lr=lr, plr=plr)
    ref = ditto_reference(d, state, part, malicious=malicious, attack=attack,
                          scale=scale, **args)
    assert_round_matches(state, new, metrics, ref, part.ids, 6)
    clean = ditto_reference(d, state, part, **args)
    benign = ids[~malicious[ids]]
    np.testing.assert_allclose(np.asarray(new.rows["Dense_0"]["kernel"])[benign], clean[0][benign],
                               atol=1e-5)
    bad = ids[malicious[ids]]
    moved = np.abs(ref[0][bad] - clean[0][bad]).max()
    assert (moved > 1e-3) if attack == "label_flip" else (moved == 0)
    assert np.abs(ref[2] - clean[2]).max() > 1e-3           # the global model is attacked


def test_median_under_sign_flip_matches_per_client_loop():
    # Issue 11: Ditto composes with any aggregator and attack of the setup. The global model
    # moves by the coordinate-wise median of the present clients' (attacked) updates; dropped
    # stragglers are absent from the median; the personal models are unaffected by the aggregator.
    d = D.synthetic(1, 1, num_clients=10, seed=3, max_size=30, min_size=8)
    lam, lr, plr, scale = 0.3, 0.05, 0.02, 3.0
    alg = ditto(models.logistic(10), lam=lam, personal_lr=plr, setup=Setup.of(
        client_lr=lr, clients_per_round=6, local_steps=3, batch_size=5, stragglers=0.3,
        aggregator="median", attack="sign_flip", attack_fraction=0.3, attack_scale=scale,
        attack_seed=2))
    state, new, metrics, part = round_and_participation(alg, d, jax.random.key(12))
    malicious = np.asarray(malicious_clients(10, 0.3, seed=2))
    ids, straggler = np.asarray(part.ids), np.asarray(part.is_straggler)
    present = ~straggler
    assert malicious[ids][present].any() and (~malicious[ids][present]).any()
    assert straggler.any() and present.sum() >= 3              # the median is over a subset
    args = dict(lam=lam, mu=0.0, lr=lr, plr=plr, malicious=malicious, attack="sign_flip",
                scale=scale)
    ref = ditto_reference(d, state, part, aggregator="median", **args)
    assert_round_matches(state, new, metrics, ref, part.ids, 10)
    np.testing.assert_allclose(metrics["clients_aggregated"], present.sum())
    mean = ditto_reference(d, state, part, aggregator="mean", **args)
    assert np.abs(ref[2] - mean[2]).max() > 1e-3               # the median is no mean here
    np.testing.assert_allclose(ref[0], mean[0])                 # personal models: the same


def test_fedadam_global_solver_matches_per_client_loop():
    # the server optimizer of the global solver acts on Ditto's global model: FedAdam (Reddi et
    # al. Alg. 2) from m = 0, v = tau^2: m = (1 - b1) g, v = b2 tau^2 + (1 - b2) g^2, g = -Delta,
    # w <- w - eta m / (sqrt(v) + tau)
    d = D.synthetic(1, 1, num_clients=6, seed=3, max_size=30, min_size=8)
    lam, lr, plr, eta, b1, b2, tau = 0.3, 0.05, 0.02, 0.03, 0.9, 0.99, 1e-3
    alg = ditto(models.logistic(10), lam=lam, personal_lr=plr, global_solver="fedadam",
                setup=Setup.of(client_lr=lr, clients_per_round=4, local_steps=3, batch_size=5,
                               server_lr=eta))
    assert alg.setup.server_opt.name == "fedadam"              # the solver's default optimizer

    def adam(w, delta):
        g = -delta
        m, v = (1 - b1) * g, b2 * tau ** 2 + (1 - b2) * g ** 2
        return w - eta * m / (np.sqrt(v) + tau)
    state, new, metrics, part = round_and_participation(alg, d)
    ref = ditto_reference(d, state, part, lam=lam, mu=0.0, lr=lr, plr=plr, server=adam)
    assert_round_matches(state, new, metrics, ref, part.ids, 6)


def test_global_solver_forms_agree():
    # a registered name, a "name:opt=value" spec and a functools.partial build the same round
    d = D.synthetic(1, 1, num_clients=6, seed=3, max_size=30, min_size=8)
    setup = Setup.of(clients_per_round=3, local_steps=2, batch_size=5, stragglers=0.5)
    model = models.logistic(10)
    out = {}
    for name, solver in (("spec", "fedprox:mu=0.5"), ("partial", functools.partial(fedprox, mu=0.5)),
                         ("default_mu", "fedprox")):
        alg = ditto(model, global_solver=solver, setup=setup)
        state = alg.init(jax.random.key(0), d)
        out[name] = (alg, jax.jit(alg.round)(state, d, jax.random.key(3)))
    assert out["spec"][0].config["global_solver"] == "fedprox:mu=0.5"
    assert out["partial"][0].config["global_solver"] == "fedprox:mu=0.5"
    assert out["spec"][0].config["drop_stragglers"] is False       # FedProx keeps stragglers
    assert ditto(model, setup=setup).config["drop_stragglers"] is True   # FedAvg drops them
    leaves = {k: jax.tree.leaves(v[1]) for k, v in out.items()}
    for a, b in zip(leaves["spec"], leaves["partial"]):
        np.testing.assert_array_equal(a, b)
    diff = lambda x, y: max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                            for a, b in zip(leaves[x], leaves[y]))
    assert diff("spec", "default_mu") > 1e-6                        # mu reaches FedProx


def test_lam_and_personal_lr_can_be_traced():
    # a sweep vmapped over (lam, personal_lr) in one program equals the runs one by one
    d = D.synthetic(1, 1, num_clients=6, seed=3, max_size=30, min_size=8)
    model = models.logistic(10)
    setup = Setup.of(clients_per_round=3, local_steps=3, batch_size=5, client_lr=0.05)
    state = ditto(model, setup=setup).init(jax.random.key(0), d)
    key = jax.random.key(4)

    def one(lam, plr):
        new, m = ditto(model, lam=lam, personal_lr=plr, setup=setup).round(state, d, key)
        return new.rows, m["personal_objective"]
    lams, plrs = jnp.array([0.0, 2.0]), jnp.array([0.01, 0.1])
    rows, objective = jax.jit(jax.vmap(one))(lams, plrs)
    for i in range(2):
        want_rows, want_obj = jax.jit(functools.partial(one, float(lams[i]), float(plrs[i])))()
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6),
                     rows, want_rows)
        np.testing.assert_allclose(objective[i], want_obj, rtol=1e-5)
    assert float(jnp.abs(rows["Dense_0"]["kernel"][0] - rows["Dense_0"]["kernel"][1]).max()) > 1e-4


def benign_accuracy(sums, benign):
    l, c, n = (np.asarray(v) for v in sums)
    return float(c[benign].sum() / n[benign].sum())


def test_robust_to_label_flipping_attackers():
    # Paper, Sec. 5.2: under attack, benign clients' Ditto models degrade far less than the global
    # FedAvg model. Ditto's global model *is* FedAvg's (same solver), so one run measures both.
    # The attackers' labels are flipped in the data (what attack="label_flip" does inside the
    # round), so clean and attacked runs share one compiled program.
    d = D.digits(num_clients=20, partition="shards=2", seed=0, test_fraction=0.25)
    malicious = malicious_clients(20, 0.5, seed=0)
    benign = ~np.asarray(malicious)
    alg = ditto(models.logistic(10), lam=0.5, setup=Setup.of(
        client_lr=0.1, clients_per_round=10, local_steps=10, batch_size=10))
    acc = {}
    for name, data in (("clean", d), ("attacked", flip_labels(d, malicious))):
        st = run(alg, data, rounds=40, key=0, eval_every=40, progress=False).state
        sums = jax.device_get(driver.evaluate(alg, st, d))
        acc[name, "fedavg"] = benign_accuracy(sums["test"], benign)
        acc[name, "ditto"] = benign_accuracy(sums["test_personal"], benign)
    drop_fedavg = acc["clean", "fedavg"] - acc["attacked", "fedavg"]
    drop_ditto = acc["clean", "ditto"] - acc["attacked", "ditto"]
    assert drop_fedavg > 0.15, acc
    assert drop_ditto < 0.3 * drop_fedavg, acc
    assert acc["attacked", "ditto"] > acc["attacked", "fedavg"] + 0.2, acc


SMOKE = ["--dataset", "synthetic:1,1,clients=10", "--rounds", "2", "--eval-every", "2",
         "--clients-per-round", "5", "--local-steps", "3", "--seed", "0", "--no-progress"]


def test_cli_runs_ditto_with_median_and_an_attack(tmp_path, capsys):
    out = str(tmp_path / "run")
    cli.main(["run", "ditto", "--aggregator", "median", "--attack", "sign_flip",
              "--attack-fraction", "0.2", "--global-solver", "fedprox", "--lam", "0.5",
              "--out", out] + SMOKE)
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["aggregator"], config["attack"], config["attack_fraction"],
            config["global_solver"], config["lam"]) == ("median", "sign_flip", 0.2, "fedprox", 0.5)
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    # the same run through the Python API
    data = D.load("synthetic:1,1,clients=10", seed=0)
    alg = ditto(models.logistic(data.num_classes), lam=0.5, global_solver="fedprox",
                setup=Setup.of(aggregator="median", attack="sign_flip", attack_fraction=0.2,
                               clients_per_round=5, local_steps=3))
    want = run(alg, data, rounds=2, key=0, eval_every=2, progress=False).history[-1]
    for k in ("test_loss", "test_personal_loss", "personal_loss", "local_loss"):
        assert rows[-1][k] == want[k], k
    assert np.isfinite(rows[-1]["test_personal_loss"])


@pytest.mark.parametrize("kwargs, name", [
    (dict(lam=-0.1), "lam"), (dict(personal_lr=0.0), "personal_lr"),
    (dict(personal_steps=0), "personal_steps"),
    (dict(personal_steps=3, setup=Setup.of(epochs=1)), "personal_steps"),
    (dict(global_solver="fedfoo"), "global_solver"),
    (dict(global_solver="ditto"), "global_solver='ditto'.*fedavg"),      # no ServerRound
    (dict(global_solver=lambda model: None), "global_solver.*takes no setup"),
    (dict(global_solver=functools.partial(fedprox, mu=-1.0)), "mu"),
    (dict(personal_lr=0.1, setup=Setup(client_opt=Optimizer.of(optax.sgd(0.1)))), "personal_lr"),
])
def test_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ditto(models.logistic(3), **kwargs)


def test_more_clients_per_round_than_clients_fails_before_compiling():
    d = D.synthetic(1, 1, num_clients=4, seed=0, max_size=20)
    with pytest.raises(ValueError, match="clients_per_round"):
        run(ditto(models.logistic(10), setup=Setup.of(clients_per_round=5)), d, rounds=1, key=0,
            progress=False)
