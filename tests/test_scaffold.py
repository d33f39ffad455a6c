"""SCAFFOLD (algorithms/scaffold.py, the algorithm the notebook write_your_own_algorithm builds):
a per-client reference loop for both control-variate options, its ablation, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lab as fl
from fedjax_lab.algorithms import fedavg, scaffold
from fedjax_lab.core.rounds import participate
from reference import softmax_grads


def reference_rounds(data, alg, params, keys, *, eta_l, eta_g, option="II"):
    """SCAFFOLD Algorithm 1, option I or II, client by client in float64 numpy. The sampled clients,
    their batches and step masks come from `participate` with the round's key (sampling and batch
    drawing are not the maths under test); everything else is written out from the paper."""
    X = np.asarray(data.x, np.float64).reshape(data.x.shape[0], -1)
    Y = np.asarray(data.y)
    x = {k: np.asarray(v, np.float64) for k, v in params["Dense_0"].items()}
    c = {k: np.zeros_like(v) for k, v in x.items()}
    c_i = [{k: np.zeros_like(v) for k, v in x.items()} for _ in range(data.num_clients)]
    N = data.num_clients
    for key in keys:
        part = participate(jax.random.split(key)[0], data, alg.setup.cohort, alg.setup.work)
        ids, idx = np.asarray(part.ids), np.asarray(part.batches.idx)
        mask, straggler = np.asarray(part.batches.step_mask), np.asarray(part.is_straggler)
        dy_sum, dc_sum, reported = {k: 0.0 for k in x}, {k: 0.0 for k in x}, 0
        for i, steps, m, s in zip(ids, idx, mask, straggler):
            if s or not m.any():           # dropped stragglers report nothing and keep c_i
                continue
            y = {k: v.copy() for k, v in x.items()}
            for rows in steps[m]:
                gW, gb = softmax_grads(y["kernel"], y["bias"], X[rows], Y[rows])
                y["kernel"] -= eta_l * (gW - c_i[i]["kernel"] + c["kernel"])
                y["bias"] -= eta_l * (gb - c_i[i]["bias"] + c["bias"])
            K = m.sum()
            if option == "II":
                new = {k: c_i[i][k] - c[k] + (x[k] - y[k]) / (K * eta_l) for k in x}
            else:                           # option I: the mean gradient at x over its batches
                grads = [softmax_grads(x["kernel"], x["bias"], X[rows], Y[rows]) for rows in steps[m]]
                new = {"kernel": np.mean([g[0] for g in grads], 0), "bias": np.mean([g[1] for g in grads], 0)}
            for k in x:
                dy_sum[k] = dy_sum[k] + (y[k] - x[k])
                dc_sum[k] = dc_sum[k] + (new[k] - c_i[i][k])
            c_i[i] = new
            reported += 1
        x = {k: x[k] + eta_g * dy_sum[k] / max(reported, 1) for k in x}
        c = {k: c[k] + dc_sum[k] / N for k in x}
    return x, c, c_i


@pytest.mark.parametrize("option", ["II", "I"])
def test_scaffold_matches_a_per_client_reference_loop(tiny_data, option):
    """Four rounds with half the sampled clients straggling (dropped: they neither count in the
    mean nor update their c_i), eta_g = 0.7."""
    model = fl.models.logistic(3)
    setup = fl.Setup.of(clients_per_round=3, local_steps=4, batch_size=3, client_lr=0.2,
                        server_lr=0.7, stragglers=0.5)
    alg = scaffold(model, option=option, setup=setup)
    state = alg.init(jax.random.key(0), tiny_data)
    params0 = state.server.params
    keys = [jax.random.key(100 + r) for r in range(4)]
    round_fn = jax.jit(alg.round)
    for key in keys:
        state, metrics = round_fn(state, tiny_data, key)
    x, c, c_i = reference_rounds(tiny_data, alg, params0, keys, eta_l=0.2, eta_g=0.7, option=option)
    stragglers = [np.asarray(participate(jax.random.split(k)[0], tiny_data, alg.setup.cohort,
                                         alg.setup.work).is_straggler) for k in keys]
    assert 0 < np.sum(stragglers) < np.size(stragglers)     # both kinds of client occur
    for k in x:
        np.testing.assert_allclose(state.server.params["Dense_0"][k], x[k], rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(state.server.extra["Dense_0"][k], c[k], rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(state.rows["Dense_0"][k], np.stack([r[k] for r in c_i]),
                                   rtol=2e-5, atol=2e-6)
    assert np.abs(c["kernel"]).max() > 1e-3          # the variates really moved
    touched = [i for i in range(tiny_data.num_clients) if np.abs(c_i[i]["kernel"]).max() > 0]
    assert touched
    deployed = alg.client_params(state, jnp.arange(2))
    np.testing.assert_array_equal(deployed["Dense_0"]["kernel"][1], state.server.params["Dense_0"]["kernel"])
    model_bytes = sum(4 * v.size for v in jax.tree.leaves(params0))
    assert float(metrics["bytes_up_per_client"]) == 2 * model_bytes        # (Delta y, Delta c)
    assert float(metrics["bytes_down_per_client"]) == 2 * model_bytes      # x and c


def test_without_control_variates_it_is_fedavg_bit_for_bit(tiny_data):
    """The ablation c = c_i = 0 is FedAvg exactly, over three rounds; with the variates on, the
    first round (from c = c_i = 0) is FedAvg's too and the later ones are not."""
    model = fl.models.logistic(3)
    flat = dict(clients_per_round=4, local_steps=3, batch_size=4, client_lr=0.1, weighting="uniform")
    off = scaffold(model, control_variates=False, setup=fl.Setup.of(**flat))
    on, avg = scaffold(model, setup=fl.Setup.of(**flat)), fedavg(model, setup=fl.Setup.of(**flat))
    params = {}
    for name, alg in (("off", off), ("on", on), ("avg", avg)):
        state, fn, params[name] = alg.init(jax.random.key(0), tiny_data), jax.jit(alg.round), []
        for r in range(3):
            state = fn(state, tiny_data, jax.random.key(5 + r))[0]
            params[name].append(alg.global_params(state)["Dense_0"]["kernel"])
    for r in range(3):
        np.testing.assert_array_equal(params["off"][r], params["avg"][r])
    np.testing.assert_allclose(params["on"][0], params["avg"][0], rtol=1e-6, atol=1e-7)
    assert np.abs(params["on"][2] - params["avg"][2]).max() > 1e-4


def test_bad_client_optimizer_is_refused():
    with pytest.raises(ValueError, match="client_optimizer must be plain 'sgd'"):
        scaffold(fl.models.logistic(3), setup=fl.Setup.of(client_momentum=0.9))
    with pytest.raises(ValueError, match="client_optimizer must be plain 'sgd'"):
        scaffold(fl.models.logistic(3), setup=fl.Setup.of(client_optimizer="adam"))
    with pytest.raises(ValueError, match="option must be one of"):
        scaffold(fl.models.logistic(3), option="III")


@pytest.mark.slow
def test_scaffold_beats_its_ablation_under_client_drift():
    """Two digit classes per client, 20 local steps: SCAFFOLD's train loss after 30 rounds is
    below FedAvg's (= SCAFFOLD with c = c_i = 0), same seeds and setup."""
    data = fl.data.load("digits:shards=2,clients=20", seed=0)
    model = fl.models.logistic(10)
    flat = dict(clients_per_round=5, local_steps=20, batch_size=10, client_lr=0.05, weighting="uniform")
    out = {}
    for name, factory in (("scaffold", scaffold), ("fedavg", fedavg)):
        out[name] = fl.run(factory(model, setup=fl.Setup.of(**flat)), data, rounds=30, key=0,
                           eval_every=30, progress=False).history[-1]
    print({n: (round(h["train_loss"], 3), round(h["test_accuracy"], 3)) for n, h in out.items()})
    assert out["scaffold"]["train_loss"] < out["fedavg"]["train_loss"] - 0.15
    assert out["scaffold"]["test_accuracy"] > out["fedavg"]["test_accuracy"] + 0.03
