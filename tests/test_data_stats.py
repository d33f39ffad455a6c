"""Dataset statistics (`fedjax-lab data SPEC`): numbers on a hand-made dataset, plots, main()."""
import json

import numpy as np
import pytest

from fedjax_lab.data import from_client_lists
from fedjax_lab.data import stats


@pytest.fixture
def two_clients():
    # client 0: labels 0, 0, 1; client 1: labels 1, 1, 1, 1, 2, 2 -> global counts [2, 5, 2]
    xs = [np.zeros((3, 2), np.float32), np.zeros((6, 2), np.float32)]
    ys = [np.array([0, 0, 1]), np.array([1, 1, 1, 1, 2, 2])]
    return from_client_lists(xs, ys, test_xs=[np.zeros((1, 2), np.float32), np.zeros((0, 2))],
                             test_ys=[np.array([2]), np.zeros(0, int)], num_classes=4)


def test_describe_numbers(two_clients):
    d = stats.describe(two_clients)
    assert d["num_clients"] == 2 and d["num_classes"] == 4 and d["num_examples"] == 9
    assert d["client_size"] == {"min": 3, "median": 4.5, "mean": 4.5, "max": 6, "total": 9}
    assert d["classes_per_client"] == {"mean": 2.0, "min": 2, "max": 2}
    g = np.array([2, 5, 2, 0]) / 9
    tv0 = 0.5 * np.abs(np.array([2, 1, 0, 0]) / 3 - g).sum()
    tv1 = 0.5 * np.abs(np.array([0, 4, 2, 0]) / 6 - g).sum()
    assert d["label_tv"] == pytest.approx((tv0 + tv1) / 2)
    assert d["dominant_fraction"] == pytest.approx((2 / 3 + 4 / 6) / 2)
    assert d["global_label_counts"] == [2, 5, 2, 0]
    assert d["test_examples"] == 1 and d["clients_without_test"] == 1
    np.testing.assert_array_equal(stats.label_counts(two_clients), [[2, 1, 0, 0], [0, 4, 2, 0]])
    text = stats.format_description(d, "toy")
    assert "min 3, median 4.5" in text and "TV to global" in text


def test_plot_writes_two_pngs(two_clients, tmp_path):
    paths = stats.plot(two_clients, str(tmp_path / "plots"))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["client_sizes.png", "label_heatmap.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_main_prints_and_plots(tmp_path, capsys):
    rc = stats.main(["digits:dirichlet=0.3,clients=12", "--out", str(tmp_path), "--json"])
    assert rc == 0
    out = capsys.readouterr().out
    d = json.loads(out[:out.index("\nwrote")])
    assert d["num_clients"] == 12 and d["num_examples"] + d["test_examples"] == 1797
    assert (tmp_path / "digits_client_sizes.png").exists()
    assert (tmp_path / "digits_label_heatmap.png").exists()
    rc = stats.main(["mnist1d:shards=2,clients=10", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "clients            10" in out and "classes per client" in out


def test_main_reports_bad_spec_without_traceback(capsys):
    assert stats.main(["nosuchdata"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'nosuchdata'" in err and "digits" in err


def test_sparse_describe_matches_dense_reference():
    rng = np.random.default_rng(0)
    sizes = [5, 0, 12, 1, 30, 7]
    ys = [rng.integers(0, 9, n) for n in sizes]
    data = from_client_lists([np.zeros((n, 1), np.float32) for n in sizes], ys, num_classes=9,
                             allow_empty=True)
    counts = np.stack([np.bincount(y, minlength=9) for y in ys]).astype(float)
    has = counts.sum(1) > 0
    p = counts[has] / counts[has].sum(1, keepdims=True)
    g = counts.sum(0) / counts.sum()
    d = stats.describe(data)
    assert d["label_tv"] == pytest.approx(0.5 * np.abs(p - g).sum(1).mean())
    assert d["dominant_fraction"] == pytest.approx(p.max(1).mean())
    assert d["classes_per_client"]["mean"] == pytest.approx((p > 0).sum(1).mean())
    assert d["empty_clients"] == 1
    np.testing.assert_array_equal(stats.label_counts(data), counts)
    np.testing.assert_array_equal(stats.label_counts(data, [4, 0], [8, 2]), counts[[4, 0]][:, [8, 2]])


def test_heatmap_of_a_large_vocabulary_shows_the_most_frequent_classes(tmp_path):
    rng = np.random.default_rng(1)
    ys = [rng.zipf(1.5, 40) % 500 for _ in range(30)]
    data = from_client_lists([np.zeros((40, 1), np.float32)] * 30, ys, num_classes=500)
    paths = stats.plot(data, str(tmp_path), max_clients=10, max_classes=20)
    assert all((tmp_path / p.rsplit("/", 1)[1]).stat().st_size > 1000 for p in paths)
