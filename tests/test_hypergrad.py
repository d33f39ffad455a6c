"""fl.hypergrad: on a quadratic toy the value and gradient equal the closed form; on logistic
regression the value is the driver's test_loss after R rounds, the gradient matches central
finite differences of independent fl.run's (FedProx mu, client and server lr; Ditto lam on the
personal models), every remat choice gives the same gradient, rematerialization bounds memory in
R, and bad input is refused before compiling.

Tolerance: float32 training, central differences with relative step 2e-3 along each coordinate
(or a fixed random direction): agreement to 1% relative (measured: <= 0.2%)."""
import numpy as np
import pytest

from fedjax_lab import Setup, algorithms, hypergrad, models, run
from fedjax_lab.core.hypergrad import memory_bytes

FLAT = dict(clients_per_round=3, local_steps=3, batch_size=4, stragglers=0.4)
MODEL = models.logistic(3)
H = dict(mu=0.1, client_lr=0.1, server_lr=1.0)
ROUNDS = 4


def _fedprox_test_loss(data, mu, client_lr, server_lr, key=3):
    """The validation loss of an independent fl.run (the driver's test_loss after R rounds)."""
    alg = algorithms.fedprox(MODEL, mu=mu, setup=Setup.of(client_lr=client_lr,
                                                          server_lr=server_lr, **FLAT))
    return run(alg, data, rounds=ROUNDS, key=key, eval_every=ROUNDS,
               progress=False).history[-1]["test_loss"]


def _ditto_test_personal_loss(data, lam, key=3):
    alg = algorithms.ditto(MODEL, lam=lam, setup=Setup.of(client_lr=0.1, **FLAT))
    return run(alg, data, rounds=ROUNDS, key=key, eval_every=ROUNDS,
               progress=False).history[-1]["test_personal_loss"]


def test_quadratic_toy_value_and_gradient_match_the_closed_form():
    """Clients F_k(w) = 1/2 ||w - a_k||^2 (every client every round, exact full-batch gradients),
    S local FedProx steps of lr eta, server SGD of lr s, uniform average: with
    c = (1 - (1 - eta (1 + mu))^S) / (1 + mu) each round is w <- w + s c (a_bar - w), so
    w_R = a_bar + (1 - s c)^R (w_0 - a_bar), and L_val = mean_k 1/2 ||w_R - b_k||^2."""
    from fedjax_lab import Cohort, LocalWork
    from fedjax_lab.data import federated_arrays
    a = np.array([[0.0, 1.0], [2.0, -1.0], [4.0, 3.0]], np.float32)
    b = np.array([[1.0, 0.0], [3.0, 1.0], [2.0, 2.0]], np.float32)
    copies, S, R = 2, 3, 5
    data = federated_arrays(np.repeat(a, copies, 0), np.zeros(6, int), np.arange(4) * copies,
                            test=models.quadratic_clients(b, copies), num_classes=1)
    setup = Setup(cohort=Cohort(3, sampling="uniform", weighting="uniform"),
                  work=LocalWork(batch_size=copies, local_steps=S))
    h = dict(mu=0.3, client_lr=0.2, server_lr=0.8)
    res = hypergrad(algorithms.fedprox, data, model=models.quadratic(2), wrt=h, rounds=R, key=0,
                    setup=setup)

    def closed_form(mu, client_lr, server_lr):
        c = (1 - (1 - client_lr * (1 + mu)) ** S) / (1 + mu)
        w_r = a.astype(np.float64).mean(0) * (1 - (1 - server_lr * c) ** R)      # w_0 = 0
        return 0.5 * np.mean(np.sum((w_r - b.astype(np.float64)) ** 2, -1))
    np.testing.assert_allclose(res.value, closed_form(**h), rtol=1e-5)
    for k in h:                  # the closed form's derivative, by central differences in float64
        e = 1e-6
        d = (closed_form(**{**h, k: h[k] + e}) - closed_form(**{**h, k: h[k] - e})) / (2 * e)
        np.testing.assert_allclose(res.grads[k], d, rtol=1e-4, atol=1e-6, err_msg=k)
    assert all(abs(res.grads[k]) > 1e-2 for k in h)


@pytest.mark.slow
def test_fedprox_hypergrad_is_the_driver_loss_and_its_directional_derivative(tiny_data):
    res = hypergrad(algorithms.fedprox, tiny_data, model=MODEL, wrt=H, rounds=ROUNDS, key=3,
                    setup=Setup.of(**FLAT))
    assert res.personal is False
    np.testing.assert_allclose(res.value, _fedprox_test_loss(tiny_data, **H), rtol=1e-5)
    u = {"mu": 1.0, "client_lr": -1.0, "server_lr": 0.5}      # relative direction
    e = 2e-3
    plus = _fedprox_test_loss(tiny_data, **{k: H[k] * (1 + e * u[k]) for k in H})
    minus = _fedprox_test_loss(tiny_data, **{k: H[k] * (1 - e * u[k]) for k in H})
    fd = (plus - minus) / (2 * e)
    analytic = sum(res.grads[k] * H[k] * u[k] for k in H)
    assert abs(analytic) > 1e-2                      # a derivative that is there to match
    np.testing.assert_allclose(analytic, fd, rtol=1e-2)


@pytest.mark.slow
def test_ditto_lam_gradient_of_the_personal_loss_matches_finite_differences(tiny_data):
    lam = 0.5
    res = hypergrad(algorithms.ditto, tiny_data, model=MODEL, wrt={"lam": lam}, rounds=ROUNDS,
                    key=3, setup=Setup.of(client_lr=0.1, **FLAT))
    assert res.personal is True
    np.testing.assert_allclose(res.value, _ditto_test_personal_loss(tiny_data, lam), rtol=1e-5)
    e = 2e-3 * lam
    fd = (_ditto_test_personal_loss(tiny_data, lam + e)
          - _ditto_test_personal_loss(tiny_data, lam - e)) / (2 * e)
    assert abs(res.grads["lam"]) > 1e-3
    np.testing.assert_allclose(res.grads["lam"], fd, rtol=1e-2)


@pytest.mark.slow
def test_remat_choices_give_the_same_gradient(tiny_data):
    args = dict(model=MODEL, wrt=H, rounds=5, key=1, setup=Setup.of(**FLAT))
    ref = hypergrad(algorithms.fedprox, tiny_data, remat="round", **args)
    seg = hypergrad(algorithms.fedprox, tiny_data, remat=2, **args)   # 2 segments of 2 + 1 tail
    np.testing.assert_allclose(seg.value, ref.value, rtol=1e-6)
    for k in H:
        np.testing.assert_allclose(seg.grads[k], ref.grads[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_each_fedprox_coordinate_matches_finite_differences(tiny_data):
    res = hypergrad(algorithms.fedprox, tiny_data, model=MODEL, wrt=H, rounds=ROUNDS, key=3,
                    setup=Setup.of(**FLAT), remat="none")
    for k in H:
        e = 2e-3 * H[k]
        fd = (_fedprox_test_loss(tiny_data, **{**H, k: H[k] + e})
              - _fedprox_test_loss(tiny_data, **{**H, k: H[k] - e})) / (2 * e)
        np.testing.assert_allclose(res.grads[k], fd, rtol=1e-2, atol=1e-4, err_msg=k)


@pytest.mark.slow
def test_rematerialization_bounds_memory_in_the_number_of_rounds(tiny_data):
    """XLA's temp memory of the gradient program: without remat it grows with R; with a
    checkpointed round the growth from R = 4 to 32 is a small fraction. (On this tiny state,
    segments of 4 do not beat per-round checkpoints: 17,520 vs 16,096 bytes at R = 32.)"""
    args = dict(model=MODEL, wrt=H, setup=Setup.of(**FLAT))
    mem = {(remat, R): memory_bytes(algorithms.fedprox, tiny_data, rounds=R, remat=remat, **args)
           for remat in ("none", "round") for R in (4, 32)}
    assert mem[("none", 32)] > 4 * mem[("none", 4)]
    assert mem[("round", 32)] < 2 * mem[("round", 4)]


@pytest.mark.parametrize("kw, match", [
    (dict(wrt={"nu": 0.1}), "wrt: unknown name 'nu' for fedprox; valid names: .*client_lr"),
    (dict(wrt={"local_steps": 3}), r"wrt\['local_steps'\] must be a float hyperparameter"),
    (dict(wrt={}), "wrt must be a non-empty dict"),
    (dict(wrt={"mu": -1.0}), "mu must be >= 0"),
    (dict(remat=0), "remat must be 'round', 'none' or a positive int"),
    (dict(rounds=0), "rounds must be > 0"),
    (dict(wrt={"mu": 0.1}, fixed={"mu": 0.2}), "also in wrt"),
])
def test_bad_hypergrad_arguments(kw, match, tiny_data):
    args = dict(model=MODEL, wrt={"mu": 0.1}, rounds=2, key=0, setup=Setup.of(**FLAT))
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        hypergrad(algorithms.fedprox, tiny_data, **args)


def test_a_hyperparameter_needed_as_a_number_is_refused(tiny_data):
    with pytest.raises(ValueError, match=r"needs one of them as a Python number"):
        hypergrad(algorithms.fedavg, tiny_data, model=MODEL, wrt={"attack_fraction": 0.4},
                  fixed={"attack": "sign_flip"}, rounds=1, key=0, setup=Setup.of(**FLAT))
    with pytest.raises(ValueError, match="validation must have the training data's 5 clients"):
        from fedjax_lab.data import from_client_lists
        one = from_client_lists([np.zeros((2, 4), np.float32)], [np.zeros(2, int)], num_classes=3)
        hypergrad(algorithms.fedprox, tiny_data, model=MODEL, wrt={"mu": 0.1}, rounds=1, key=0,
                  setup=Setup.of(**FLAT), validation=one)
