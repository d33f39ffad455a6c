import numpy as np
import pytest

from fedjax_lab.data import federated_arrays, from_client_lists, split_clients


def test_layout_and_sizes():
    d = from_client_lists([np.ones((2, 3)), np.zeros((5, 3))], [np.array([0, 1]), np.arange(5) % 2])
    assert d.num_clients == 2 and d.num_examples == 7
    np.testing.assert_array_equal(d.client_sizes, [2, 5])
    np.testing.assert_array_equal(d.offsets, [0, 2, 7])
    np.testing.assert_array_equal(d.client_ids(), [0, 0, 1, 1, 1, 1, 1])
    assert (d.min_client_size, d.max_client_size, d.num_classes) == (2, 5, 2)


@pytest.mark.parametrize("x, y, offsets, match", [
    (np.zeros((4, 2)), np.zeros(3, int), [0, 4], "same length"),
    (np.zeros((4, 2)), np.zeros(4, int), [0, 3, 2, 4], "non-decreasing"),
    (np.zeros((4, 2)), np.zeros(4, int), [0, 2, 2, 4], "empty client"),
    (np.zeros((4, 2)), np.zeros(4, int), [1, 4], "start at 0"),
    (np.zeros((4, 2)), np.zeros(4, int), [0, 3], "end at len"),
    (np.zeros((4, 2)), np.zeros(4, int), [0.0, 4.0], "integers"),
])
def test_bad_arrays_name_the_argument(x, y, offsets, match):
    with pytest.raises(ValueError, match=match):
        federated_arrays(x, y, np.asarray(offsets))


def test_empty_clients_allowed_when_asked():
    d = federated_arrays(np.zeros((4, 2)), np.zeros(4, int), np.array([0, 2, 2, 4]), allow_empty=True)
    assert d.min_client_size == 0


def test_labels_out_of_range():
    with pytest.raises(ValueError, match="num_classes"):
        federated_arrays(np.zeros((2, 1)), np.array([0, 3]), np.array([0, 2]), num_classes=3)


def test_split_clients_holds_out_a_share_of_each_client():
    owner = np.repeat(np.arange(4), [10, 20, 1, 5])
    x = np.arange(36, dtype=np.float32)[:, None]
    d = split_clients(x, owner % 3, owner, 4, test_fraction=0.2, seed=0)
    np.testing.assert_array_equal(d.test.client_sizes, [2, 4, 0, 1])
    np.testing.assert_array_equal(d.client_sizes, [8, 16, 1, 4])
    # every example lands once, in its own client's train or test split
    for k in range(4):
        rows = np.concatenate([np.asarray(d.client(k)[0]), np.asarray(d.test.client(k)[0])]).ravel()
        np.testing.assert_array_equal(np.sort(rows), np.flatnonzero(owner == k))
