"""`fedjax-lab plot`: curves (mean +- std over a sweep's seeds), bytes on x, per-client histograms."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

import fedjax_lab as fl
from fedjax_lab import plot
from fedjax_lab.algorithms import ditto, fedavg

SETUP = dict(clients_per_round=3, local_steps=2, batch_size=4, client_lr=0.1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """A sweep dir (FedAvg, seeds 0-2), one Ditto run with clients.json, and a dir of two runs
    whose configs differ in more than the seed."""
    root = tmp_path_factory.mktemp("runs")
    model = fl.models.logistic(3)
    alg = fedavg(model, setup=fl.Setup.of(**SETUP))
    for seed in range(3):
        fl.run(alg, tiny_data, rounds=4, key=seed, eval_every=2, progress=False,
               out=str(root / "sweep" / f"seed{seed}"))
    d = ditto(model, lam=0.5, setup=fl.Setup.of(**SETUP))
    res = fl.run(d, tiny_data, rounds=4, key=0, eval_every=2, progress=False, out=str(root / "ditto"))
    plot.write_client_metrics(str(root / "ditto"), d, res.state, tiny_data)
    for name, seed in (("a", 0), ("b", 1)):     # two seeds, but b's config says another client_lr
        shutil.copytree(root / "sweep" / f"seed{seed}", root / "mixed" / name)
    cfg = json.load(open(root / "mixed" / "b" / "config.json"))
    cfg["client_lr"] = 0.5
    json.dump(cfg, open(root / "mixed" / "b" / "config.json", "w"))
    return root, d, res.state


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_sweep_curve_is_mean_and_std_over_seeds(runs):
    root = runs[0]
    hists = [_jsonl(root / "sweep" / f"seed{s}" / "metrics.jsonl") for s in range(3)]
    acc = np.array([[h["test_accuracy"] for h in hist] for hist in hists])
    assert acc.std(0).max() > 0             # the seeds really differ
    xs, mean, std, n = plot.curve(str(root / "sweep"), "round", "test_accuracy")
    assert n == 3
    np.testing.assert_array_equal(xs, [2, 4])
    np.testing.assert_allclose(mean, acc.mean(0))
    np.testing.assert_allclose(std, acc.std(0))
    fig = plot.plot_curves([str(root / "sweep"), str(root / "ditto")], y=["test_accuracy", "train_loss"])
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), acc.mean(0))
    band = ax.collections[0].get_paths()[0].vertices[:, 1]   # the fill_between polygon
    np.testing.assert_allclose([band.min(), band.max()],
                               [(acc.mean(0) - acc.std(0)).min(), (acc.mean(0) + acc.std(0)).max()])
    assert len(fig.axes) == 2 and len(ax.collections) == 1    # a single run draws no band


def test_a_directory_of_configurations_gives_one_curve_each(runs):
    root = runs[0]
    groups = plot.configurations(str(root / "mixed"))
    assert [(d, [os.path.basename(r) for r in members]) for d, members in groups] == [
        ({"client_lr": 0.1}, ["a"]), ({"client_lr": 0.5}, ["b"])]
    assert plot.configurations(str(root / "sweep"))[0][0] == {}
    ax = plot.plot_curves([str(root / "mixed")]).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mixed client_lr=0.1",
                                                                   "mixed client_lr=0.5"]


def test_bytes_axis_uses_running_totals(runs):
    root = runs[0]
    hist = _jsonl(root / "ditto" / "metrics.jsonl")
    xs, mean, std, n = plot.curve(str(root / "ditto"), "bytes_up", "test_accuracy")
    assert std is None and n == 1
    np.testing.assert_array_equal(xs, [h["total_bytes_up"] for h in hist])
    assert xs[1] == 2 * xs[0] > 0


def test_cmd_plot_writes_png_and_svg(runs, tmp_path):
    root = runs[0]
    png, svg = str(tmp_path / "a.png"), str(tmp_path / "b.svg")
    assert plot.cmd_plot([str(root / "sweep"), str(root / "ditto"), "--x", "bytes_up",
                          "--y", "test_accuracy", "train_loss", "--out", png]) == 0
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert plot.cmd_plot([str(root / "ditto"), "--hist", "--out", svg]) == 0
    assert "<svg" in open(svg).read(2000)


def test_client_metrics_match_a_per_client_loop(runs, tiny_data):
    root, alg, state = runs
    table = json.load(open(root / "ditto" / "clients.json"))
    test = tiny_data.test
    offsets = np.asarray(test.offsets)
    personal, glob = [], []
    for k in range(tiny_data.num_clients):       # independent: each client's own params, one by one
        x, y = np.asarray(test.x[offsets[k]:offsets[k + 1]]), np.asarray(test.y[offsets[k]:offsets[k + 1]])
        p_k = jax.tree.map(lambda a: a[0], alg.client_params(state, jnp.array([k])))
        personal.append(np.mean(np.argmax(alg.model.apply(p_k, x), -1) == y))
        glob.append(np.mean(np.argmax(alg.model.apply(alg.global_params(state), x), -1) == y))
    np.testing.assert_allclose(table["test_personal_accuracy"], personal)
    np.testing.assert_allclose(table["test_accuracy"], glob)
    last = _jsonl(root / "ditto" / "metrics.jsonl")[-1]
    counts = np.asarray(table["test_personal_count"])
    np.testing.assert_allclose(np.sum(np.asarray(personal) * counts) / counts.sum(),
                               last["test_personal_accuracy"], rtol=1e-6)
    fig = plot.plot_histograms([str(root / "ditto")])
    assert [a.get_xlabel() for a in fig.axes] == ["per-client test accuracy",
                                                  "per-client test personal accuracy"]
    heights = [p.get_height() for p in fig.axes[1].patches]
    assert sum(heights) == tiny_data.num_clients
    np.testing.assert_array_equal(heights, np.histogram(personal, bins=np.linspace(0, 1, 21))[0])


def test_errors_name_the_problem(runs, tmp_path):
    root = runs[0]
    with pytest.raises(ValueError, match=r"holds 2 configurations \(they differ in \['client_lr'\]\)"):
        plot.curve(str(root / "mixed"), "round", "test_accuracy")
    with pytest.raises(ValueError, match="metric 'nope' is not in metrics.jsonl"):
        plot.curve(str(root / "ditto"), "round", "nope")
    with pytest.raises(ValueError, match="neither a run directory"):
        plot.curve(str(tmp_path), "round", "test_accuracy")
    with pytest.raises(ValueError, match="no clients.json"):
        plot.client_values(str(root / "sweep"), "test_accuracy")
    with pytest.raises(SystemExit, match="--out must end in .png, .svg or .pdf"):
        plot.cmd_plot([str(root / "ditto"), "--out", str(tmp_path / "x.jpg")])
    with pytest.raises(SystemExit, match="one label per RUN_DIR"):
        plot.cmd_plot([str(root / "ditto"), "--labels", "a", "b", "--out", str(tmp_path / "x.png")])
    assert not os.path.exists(tmp_path / "x.png")
