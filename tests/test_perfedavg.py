"""Per-FedAvg: the finite-difference Hessian-vector product against the exact one (closed form for
softmax regression) as delta -> 0; one round of FO, HF and the exact-HVP variant against a
per-client numpy loop; traced inner_lr; personalized accuracy after the alpha-step beats FedAvg's
global model on a 2-labels-per-client split of digits and of MNIST-1D, on training and on new
clients; the CLI; bad input."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import Setup, cli, models
from fedjax_lab import data as D
from fedjax_lab.algorithms import fedavg, perfedavg_fo, perfedavg_hf
from fedjax_lab.algorithms.perfedavg import meta_direction
from fedjax_lab.core import driver, meta
from fedjax_lab.core.rounds import participate
from tests.references.perfedavg import per_fedavg_reference, softmax_hvp, xent  # noqa: F401
from tests.references._common import softmax_grads  # noqa: F401


def tiny_problem(seed=0, B=6, dim=4, classes=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3 * B, dim))
    y = rng.integers(0, classes, 3 * B)
    W, b = rng.normal(0, 0.5, (dim, classes)), rng.normal(0, 0.5, classes)
    return x, y, W, b


def test_finite_difference_hvp_converges_to_the_exact_one():
    # HF's d = [grad f(w + delta g, D'') - grad f(w - delta g, D'')] / (2 delta) is a central
    # difference: its error is O(delta^2). In float64 the relative error falls ~100x per 10x
    # smaller delta (measured 2.5e-4, 2.5e-6, 2.5e-8, 2.5e-10 at delta = 1e-1 ... 1e-4); the exact
    # variant equals the closed form to 1e-10.
    x, y, W, b = tiny_problem()
    B, alpha = 6, 0.7
    model = models.logistic(3)
    with jax.enable_x64(True):
        w = {"Dense_0": {"kernel": jnp.asarray(W), "bias": jnp.asarray(b)}}
        xb, yb = jnp.asarray(x), jnp.asarray(y)

        def hvp(hessian, delta=1.0):
            # d = (g - direction) / alpha, with g the FO direction on the same batches
            _, g = meta_direction(model, alpha)(w, xb, yb, None)
            _, d = meta_direction(model, alpha, hessian=hessian, hvp_delta=delta)(w, xb, yb, None)
            return [np.asarray(u - v) / alpha for u, v in
                    zip(jax.tree.leaves(g), jax.tree.leaves(d))]

        exact = hvp("exact")
        errors = [max(np.abs(e - f).max() / np.abs(e).max()
                      for e, f in zip(exact, hvp("finite_difference", delta)))
                  for delta in (1e-1, 1e-2, 1e-3, 1e-4)]
    # the closed form, independent of jax: g = grad f(w~, D'), w~ = w - alpha grad f(w, D)
    g0W, g0b = softmax_grads(W, b, x[:B], y[:B])
    gW, gb = softmax_grads(W - alpha * g0W, b - alpha * g0b, x[B:2 * B], y[B:2 * B])
    hW, hb = softmax_hvp(W, b, x[2 * B:], y[2 * B:], gW, gb)
    leaves = {"bias": hb, "kernel": hW}            # jax.tree.leaves orders the dict by key
    for got, (name, want) in zip(exact, sorted(leaves.items())):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=name)
    assert errors[0] > 1e-5, errors                # a visible error at a coarse delta ...
    for coarse, fine in zip(errors, errors[1:]):
        assert fine < coarse / 50, errors          # ... shrinking like delta^2
    assert errors[-1] < 1e-8, errors
    # in float32 rounding (~eps / delta) takes over below delta ~ 1e-2: the default delta = 1e-2
    w32 = {"Dense_0": {"kernel": jnp.asarray(W, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}}
    x32 = jnp.asarray(x, jnp.float32)
    _, g = meta_direction(model, alpha)(w32, x32, jnp.asarray(y), None)
    _, d = meta_direction(model, alpha, hessian="finite_difference", hvp_delta=1e-2)(
        w32, x32, jnp.asarray(y), None)
    fd32 = [np.asarray(u - v) / alpha for u, v in zip(jax.tree.leaves(g), jax.tree.leaves(d))]
    err32 = max(np.abs(e - f).max() / np.abs(e).max() for e, f in zip(exact, fd32))
    assert err32 < 1e-4, err32


@pytest.mark.parametrize("variant, stragglers", [("fo", 0.0), ("hf", 0.0), ("exact", 0.0),
                                                 ("hf", 0.5)])
def test_one_round_matches_per_client_loop(variant, stragglers):
    d = D.synthetic(1, 1, num_clients=6, seed=3, max_size=40, min_size=16)
    alpha, beta, delta, B = 0.3, 0.1, 0.05, 4
    setup = Setup.of(client_lr=beta, clients_per_round=4, local_steps=3, batch_size=B,
                     stragglers=stragglers)
    model = models.logistic(10)
    alg = perfedavg_fo(model, inner_lr=alpha, setup=setup) if variant == "fo" else perfedavg_hf(
        model, inner_lr=alpha, hvp_delta=delta, setup=setup,
        hessian="exact" if variant == "exact" else "finite_difference")
    state = jax.jit(alg.init)(jax.random.key(0), d)
    key = jax.random.key(11)
    new, metrics = jax.jit(alg.round)(state, d, key)
    # the round's participation, drawn as the skeleton does (key split into k_part, k_train),
    # with batches of 3B rows per step: D, D', D'' are their thirds
    k_part = jax.random.split(key)[0]
    work = dataclasses.replace(alg.setup.work, batch_size=3 * B)
    part = jax.jit(participate, static_argnums=(2, 3))(k_part, d, alg.setup.cohort, work)
    if stragglers:
        assert 0 < int(part.is_straggler.sum()) < 4          # the case under test happens
    W, b, loss = per_fedavg_reference(d, state.params, part, variant=variant, alpha=alpha,
                                      beta=beta, delta=delta, B=B)
    np.testing.assert_allclose(new.params["Dense_0"]["kernel"], W, atol=1e-5)
    np.testing.assert_allclose(new.params["Dense_0"]["bias"], b, atol=1e-5)
    np.testing.assert_allclose(metrics["local_loss"], loss, rtol=1e-5)
    # and the three variants (and FedAvg) really differ on this round
    if variant != "fo":
        W_fo, _, _ = per_fedavg_reference(d, state.params, part, variant="fo", alpha=alpha,
                                          beta=beta, delta=delta, B=B)
        assert np.abs(W - W_fo).max() > 1e-4


# inner_lr and hvp_delta traced under jax.vmap: tests/test_conformance.py (both variants).


# ---------------------------------------------------------------------------------------------
# Learning: personalized accuracy after the alpha-step beats FedAvg's global model.

ROUNDS, SEEDS = 30, (0, 1, 2)


def test_personalized_accuracy_beats_fedavg_on_training_and_new_clients():
    # Paper, Sec. 5: after one local step on its own data, the Per-FedAvg model beats the FedAvg
    # model on heterogeneous users. Digits, 2 labels per client, 40 clients of which 30 train and
    # 10 are new (core/meta.py's client roles); the alpha-step uses a client's train split, the
    # accuracy its held-out test split. Seeds 0-2 of training run as one vmapped program.
    d = D.digits(num_clients=40, partition="shards=2", seed=0, test_fraction=0.25)
    train_ids, _, new_ids = meta.client_roles(40, (0.75, 0.0, 0.25), seed=0)
    train = meta.select_clients(d, train_ids)
    setup = Setup.of(client_lr=0.1, clients_per_round=10, local_steps=5, batch_size=10,
                     weighting="uniform")
    model = models.logistic(10)
    algs = {"fedavg": fedavg(model, setup=setup),
            "fo": perfedavg_fo(model, inner_lr=0.3, setup=setup),
            "hf": perfedavg_hf(model, inner_lr=0.3, hvp_delta=1e-2, setup=setup)}
    acc = {}
    for name, alg in algs.items():
        def train_and_evaluate(seed, alg=alg, name=name):
            state = alg.init(jax.random.key(seed), train)
            state = driver.run_rounds(alg, state, train, jax.random.key(seed + 100),
                                      jnp.int32(0), ROUNDS)[0]
            adapt = meta.no_adapt(lambda st: st.params) if name == "fedavg" else alg.adapt
            return meta.adapted_sums(model, adapt, state, d, d.test)   # all 40 clients' sums
        _, correct, count = jax.device_get(
            jax.jit(jax.vmap(train_and_evaluate))(jnp.asarray(SEEDS)))
        for i, seed in enumerate(SEEDS):
            for role, ids in (("train", train_ids), ("new", new_ids)):
                acc[seed, name, role] = correct[i][ids].sum() / count[i][ids].sum()
    for seed in SEEDS:
        for role in ("train", "new"):
            for name in ("fo", "hf"):
                assert acc[seed, name, role] > acc[seed, "fedavg", role] + 0.05, acc


def _perfedavg_accuracies(d, train_ids, new_ids, seeds, rounds, inner_lr):
    """{(seed, row, role): accuracy} for rows fedavg (global model), fedavg_step (FedAvg's model
    after the same alpha-step: the FedAvg(Meta) of this protocol), fo, hf; seeds vmapped."""
    train = meta.select_clients(d, train_ids)
    setup = Setup.of(client_lr=0.1, clients_per_round=10, local_steps=5, batch_size=10,
                     weighting="uniform")
    model = models.logistic(10)
    fo = perfedavg_fo(model, inner_lr=inner_lr, setup=setup)
    algs = {"fedavg": fedavg(model, setup=setup), "fo": fo,
            "hf": perfedavg_hf(model, inner_lr=inner_lr, hvp_delta=1e-2, setup=setup)}
    rows = {"fedavg": {"fedavg": meta.no_adapt(lambda st: st.params), "fedavg_step": fo.adapt},
            "fo": {"fo": fo.adapt}, "hf": {"hf": algs["hf"].adapt}}
    acc = {}
    for name, alg in algs.items():
        def train_and_evaluate(seed, alg=alg, name=name):
            state = alg.init(jax.random.key(seed), train)
            state = driver.run_rounds(alg, state, train, jax.random.key(seed + 100),
                                      jnp.int32(0), rounds)[0]
            return {row: meta.adapted_sums(model, a, state, d, d.test)[1:]
                    for row, a in rows[name].items()}
        out = jax.device_get(jax.jit(jax.vmap(train_and_evaluate))(jnp.asarray(seeds)))
        for row, (correct, count) in out.items():
            for i, seed in enumerate(seeds):
                for role, ids in (("train", train_ids), ("new", new_ids)):
                    acc[seed, row, role] = float(correct[i][ids].sum() / count[i][ids].sum())
    return acc


@pytest.mark.slow
def test_personalized_accuracy_beats_fedavg_on_mnist1d():
    # As above on MNIST-1D: 40 clients with 2 labels each (100 train, ~25 test signals per
    # client), 30 training and 10 new clients, 30 rounds, seeds 0-2 vmapped. FedAvg + alpha-step
    # (the FedAvg(Meta) baseline of this protocol) is printed beside.
    d = D.mnist1d(num_clients=40, partition="shards=2", seed=0)
    train_ids, _, new_ids = meta.client_roles(40, (0.75, 0.0, 0.25), seed=0)
    acc = _perfedavg_accuracies(d, train_ids, new_ids, SEEDS, ROUNDS, inner_lr=0.3)
    print("MNIST-1D Per-FedAvg:", {k: round(v, 3) for k, v in sorted(acc.items())})
    for seed in SEEDS:
        for role in ("train", "new"):
            for name in ("fo", "hf"):
                assert acc[seed, name, role] > acc[seed, "fedavg", role] + MNIST1D_MARGIN, acc


# measured on MNIST-1D, seeds 0 / 1 / 2, accuracy margin over FedAvg's global model (train, new):
#   FO (.266, .303) (.265, .299) (.268, .252); HF (.279, .331) (.277, .322) (.271, .299);
#   FedAvg + alpha-step (.242, .295) (.256, .307) (.259, .244): Per-FedAvg's edge over it is small
MNIST1D_MARGIN = 0.15


# ---------------------------------------------------------------------------------------------

def test_cli_lists_and_runs_both_variants(tmp_path, capsys):
    cli.main(["list"])
    listed = capsys.readouterr().out
    assert "perfedavg_fo" in listed and "perfedavg_hf" in listed
    out = str(tmp_path / "run")
    cli.main(["run", "perfedavg_hf", "--dataset", "synthetic:1,1,clients=10", "--rounds", "2",
              "--eval-every", "2", "--clients-per-round", "5", "--local-steps", "2",
              "--inner-lr", "0.05", "--hvp-delta", "0.01", "--client-lr", "0.02", "--seed", "0",
              "--no-progress", "--out", out])
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["algorithm"], config["inner_lr"], config["hvp_delta"], config["client_lr"],
            config["hessian"], config["weighting"]) == (
                "perfedavg_hf", 0.05, 0.01, 0.02, "finite_difference", "uniform")
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert np.isfinite(rows[-1]["local_loss"])


@pytest.mark.parametrize("factory, kwargs, name", [
    (perfedavg_fo, dict(inner_lr=-0.1), "inner_lr"),
    (perfedavg_hf, dict(inner_lr=-1e-3), "inner_lr"),
    (perfedavg_hf, dict(hvp_delta=0.0), "hvp_delta"),
    (perfedavg_hf, dict(hvp_delta=-0.01), "hvp_delta"),
    (perfedavg_hf, dict(hessian="none"), "hessian"),
    (perfedavg_fo, dict(adapt_steps=0), "adapt_steps"),
    (perfedavg_fo, dict(adapt_batch_size=0), "adapt_batch_size"),
])
def test_bad_hyperparameters(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(models.logistic(3), **kwargs)
