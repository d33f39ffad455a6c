import numpy as np
import pytest

from fedjax_lab.data import load, synthetic


def test_shapes_sizes_and_determinism():
    d = synthetic(1.0, 1.0, seed=0)
    assert d.num_clients == 30 and d.x.shape[1] == 60 and d.num_classes == 10
    total = np.asarray(d.client_sizes) + np.asarray(d.test.client_sizes)
    assert total.min() >= 50                               # lognormal(4, 2) + 50
    np.testing.assert_allclose(np.asarray(d.test.client_sizes) / total, 0.1, atol=0.02)
    d2 = synthetic(1.0, 1.0, seed=0)
    np.testing.assert_array_equal(d.x, d2.x)
    assert not np.array_equal(np.asarray(d.x[:5]), np.asarray(synthetic(1.0, 1.0, seed=1).x[:5]))


def test_covariance_is_j_to_the_minus_1_2():
    d = synthetic(0.0, 0.0, iid=True, num_clients=4, seed=0, min_size=5000, sigma_size=0.01)
    var = np.asarray(d.x).var(0)
    np.testing.assert_allclose(var, np.arange(1, 61) ** -1.2, rtol=0.1)
    np.testing.assert_allclose(np.asarray(d.x).mean(0), 0.0, atol=0.05)


def test_beta_controls_input_heterogeneity():
    def spread(beta):
        d = synthetic(0.0, beta, num_clients=20, seed=1, min_size=200, sigma_size=0.01)
        means = np.stack([np.asarray(d.client(k)[0]).mean(0).mean() for k in range(20)])
        return means.std()
    assert spread(3.0) > 2 * spread(0.0)


def test_alpha_shifts_every_logit_equally_as_in_the_generator():
    """u_k enters W_k and b_k as a common mean, so it adds the same amount to every logit and
    leaves y unchanged (a property of FedProx's generator, documented in the module)."""
    a = synthetic(0.0, 0.5, num_clients=6, seed=2)
    b = synthetic(5.0, 0.5, num_clients=6, seed=2)
    np.testing.assert_array_equal(a.y, b.y)
    # the per-client models still differ: label distributions vary across clients
    y, off = np.asarray(a.y), np.asarray(a.offsets)
    hists = np.stack([np.bincount(y[off[k]:off[k + 1]], minlength=10) / (off[k + 1] - off[k])
                      for k in range(6)])
    assert hists.std(0).max() > 0.1


def test_spec_and_errors():
    d = load("synthetic:0.5,0.5,clients=7")
    assert d.num_clients == 7
    with pytest.raises(ValueError, match="alpha"):
        synthetic(-1.0, 1.0)
    with pytest.raises(ValueError, match="valid options"):
        load("synthetic:flavour=3")
    with pytest.raises(ValueError, match="valid datasets"):
        load("nonsense")
