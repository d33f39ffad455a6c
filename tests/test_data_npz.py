"""Plain .npz of (x, y, client_id): round trips and errors."""
import re

import numpy as np
import pytest

from fedjax_lab.data import from_client_lists, load, load_npz, save_npz


def _assert_same(a, b):
    for sa, sb in ((a, b), (a.test, b.test)):
        np.testing.assert_array_equal(np.asarray(sa.x), np.asarray(sb.x))
        np.testing.assert_array_equal(np.asarray(sa.y), np.asarray(sb.y))
        np.testing.assert_array_equal(np.asarray(sa.offsets), np.asarray(sb.offsets))
    assert a.num_classes == b.num_classes


def test_save_then_load_gives_the_data_back(tmp_path):
    rng = np.random.default_rng(0)
    sizes, tsizes = [3, 1, 6], [2, 0, 1]
    d = from_client_lists([rng.normal(size=(n, 2, 2)).astype(np.float32) for n in sizes],
                          [rng.integers(0, 5, n) for n in sizes],
                          test_xs=[rng.normal(size=(n, 2, 2)).astype(np.float32) for n in tsizes],
                          test_ys=[rng.integers(0, 5, n) for n in tsizes], num_classes=7)
    path = save_npz(d, tmp_path / "d")
    assert path.endswith(".npz")
    _assert_same(load_npz(path), d)
    _assert_same(load(f"npz:{path}"), d)


def test_string_client_ids_group_and_hold_out(tmp_path):
    cid = np.array(["bob", "amy", "bob", "cat", "amy", "bob", "cat", "cat", "amy", "amy"])
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y, client_id=cid)
    d = load_npz(tmp_path / "d.npz", test_fraction=0.25, seed=1)
    assert d.num_clients == 3                 # sorted ids: amy, bob, cat
    total = np.asarray(d.client_sizes) + np.asarray(d.test.client_sizes)
    np.testing.assert_array_equal(total, [4, 3, 3])
    np.testing.assert_array_equal(np.asarray(d.test.client_sizes), [1, 1, 1])
    amy = np.concatenate([np.asarray(d.client(0)[0]), np.asarray(d.test.client(0)[0])]).ravel()
    np.testing.assert_array_equal(np.sort(amy), [1, 4, 8, 9])


def _corrupt_npz(path, kind):
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(300))
    elif kind == "plain text":
        path.write_text("x,y,client_id\n1,2,3\n")
    elif kind == "truncated":
        np.savez(path, x=np.zeros((50, 3)), y=np.zeros(50, int), client_id=np.zeros(50))
        path.write_bytes(path.read_bytes()[:400])
    elif kind == "a .npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif kind == "object array":
        np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=np.zeros(2, int),
                 client_id=np.zeros(2))


@pytest.mark.parametrize("kind", ["random bytes", "plain text", "truncated", "a .npy",
                                  "object array"])
def test_corrupt_file_names_the_file_and_the_format(tmp_path, kind):
    path = tmp_path / "data.npz"
    _corrupt_npz(path, kind)
    match = (re.escape(f"npz:{path}: could not read as a .npz archive") +
             ".*expected an .npz written by numpy.savez .* x .* y .* client_id")
    with pytest.raises(ValueError, match=match) as info:
        load_npz(path)
    assert "If you trust the file" not in str(info.value)   # numpy's pickle advice is wrong here
    with pytest.raises(ValueError, match=match):             # the CLI's route
        load(f"npz:{path}")


def test_wrong_shapes_name_the_file(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((3, 1)), y=np.zeros((3, 2), int), client_id=np.zeros(3))
    with pytest.raises(ValueError, match=re.escape(f"npz:{tmp_path / 'a.npz'}: x must be [n, ...]")):
        load_npz(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", x=np.zeros((3, 1)), y=np.zeros(3, int), client_id=np.zeros(3),
             x_test=np.zeros((2, 1)), y_test=np.zeros(1, int), client_id_test=np.zeros(1))
    with pytest.raises(ValueError, match=r"x_test, y_test and client_id_test must have the same "
                                         r"length, got \[2, 1, 1\]"):
        load_npz(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", x=np.zeros((3, 1)), y=np.zeros(3, int), client_id=np.zeros(3),
             num_classes=np.array([2, 3]))
    with pytest.raises(ValueError, match="num_classes must be one integer"):
        load_npz(tmp_path / "c.npz")


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"npz:{tmp_path / 'none.npz'}: file "
                                                          "does not exist")):
        load_npz(tmp_path / "none.npz")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_npz(tmp_path)
    np.savez(tmp_path / "a.npz", x=np.zeros((3, 1)), y=np.zeros(3, int))
    with pytest.raises(ValueError, match=r"lacks keys \['client_id'\]"):
        load_npz(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", x=np.zeros((3, 1)), y=np.zeros(2, int), client_id=np.zeros(3))
    with pytest.raises(ValueError, match="same length"):
        load_npz(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", x=np.zeros((3, 1)), y=np.zeros(3), client_id=np.zeros(3))
    with pytest.raises(ValueError, match="integer labels"):
        load_npz(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 1)), y=np.zeros(3, int), client_id=np.zeros(3),
             x_test=np.zeros((1, 1)), y_test=np.zeros(1, int), client_id_test=np.array([7.0]))
    with pytest.raises(ValueError, match="not training clients"):
        load_npz(tmp_path / "d.npz")
    np.savez(tmp_path / "e.npz", x=np.zeros((3, 1)), y=np.zeros(3, int), client_id=np.zeros(3),
             x_test=np.zeros((1, 1)))
    with pytest.raises(ValueError, match="all of x_test, y_test, client_id_test"):
        load_npz(tmp_path / "e.npz")
    with pytest.raises(ValueError, match="unknown option 'clients' for dataset 'npz'"):
        load(f"npz:{tmp_path}/e.npz,clients=3")
