"""The personalization leaderboard (fedjax_lab/leaderboard.py): every entry is the number fl.run
gives for that method and seed, the baselines are what they say, failures are recorded."""
import json

import jax
import numpy as np
import pytest

import fedjax_lab as fl
from fedjax_lab import leaderboard as lb

SPEC = "digits:shards=2,clients=6"


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    out = tmp_path_factory.mktemp("board")
    entries = lb.leaderboard(datasets=("digits",), splits=("shards=2",), clients=6, seeds=(0, 1),
                             rounds=2, clients_per_round=3, finetune_steps=3,
                             methods=["ditto", "no_such_method"], out=str(out), progress=False)
    return entries, out


def test_an_entry_is_the_runs_number():
    data = fl.data.load(SPEC, seed=0)
    e = lb.run_method("fedavg", data, seeds=(1,), rounds=1, clients_per_round=3, finetune_steps=1)
    alg = fl.algorithms.fedavg(fl.models.logistic(10), setup=fl.Setup.of(clients_per_round=3))
    h = fl.run(alg, data, rounds=1, key=1, eval_every=1, progress=False).history[-1]
    np.testing.assert_allclose(e.accuracy[0], h["test_accuracy_client_mean"], atol=1e-6)
    assert e.metric == "test" and e.rounds == 1 and e.bytes_total == pytest.approx(
        h["total_bytes_up"] + h["total_bytes_down"])


@pytest.mark.slow
def test_entries_are_the_runs_numbers(board):
    entries, out = board
    by = {e.method: e for e in entries}
    assert list(by) == ["fedavg", "fedavg_ft", "local", "ditto", "no_such_method"]
    data = fl.data.load(SPEC, seed=0)
    alg = fl.algorithms.fedavg(fl.models.logistic(10), setup=fl.Setup.of(clients_per_round=3))
    h = fl.run(alg, data, rounds=2, key=1, eval_every=2, progress=False).history[-1]
    np.testing.assert_allclose(by["fedavg"].accuracy[1], h["test_accuracy_client_mean"], atol=1e-6)
    np.testing.assert_allclose(by["fedavg"].p10[1], h["test_accuracy_p10"], atol=1e-6)
    assert by["fedavg"].metric == "test" and by["ditto"].metric == "test_personal"
    assert by["fedavg_ft"].metric == "test_finetuned" and by["local"].metric == "test_personal"
    ditto = fl.algorithms.ditto(fl.models.logistic(10), lam=0.0, setup=fl.Setup.of(clients_per_round=3))
    h = fl.run(ditto, data, rounds=2, key=0, eval_every=2, progress=False).history[-1]
    np.testing.assert_allclose(by["local"].accuracy[0], h["test_personal_accuracy_client_mean"], atol=1e-6)
    assert by["fedavg"].bytes_total > 0 and by["fedavg"].rounds == 2
    assert "KeyError" in by["no_such_method"].error and by["no_such_method"].accuracy == []
    stored = json.loads((out / "leaderboard.json").read_text())
    assert [e["method"] for e in stored] == list(by)
    assert (out / "leaderboard.png").stat().st_size > 0
    assert "| digits:shards=2,clients=6 | ditto |" in (out / "leaderboard.md").read_text()


@pytest.mark.slow
def test_finetuning_starts_from_the_global_model(board):
    """FedAvg + FT with 0 steps would be FedAvg itself: with 3 steps on each client's two classes
    the personalized accuracy rises above the global model's."""
    by = {e.method: e for e in board[0]}
    assert np.mean(by["fedavg_ft"].accuracy) > np.mean(by["fedavg"].accuracy)


def test_personalization_methods_are_found_from_the_registry():
    data = fl.data.load(SPEC, seed=0)
    names = lb.personalization_methods(data)
    assert {"ditto", "pfedhn", "fedmeta_maml", "perfedavg_fo", "fedbn", "fedproto"} <= set(names)
    assert "fedavg" not in names and "scaffold" not in names
