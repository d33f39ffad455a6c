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
from tests.conftest import count_compiles

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


# ---------------------------------------------------------------------------------------------
# Over the registry: every algorithm's hypergradient equals central differences, or it refuses.

def float_hyperparameters(factory) -> dict:
    """{name: default} of the float hyperparameters a sweep may trace: the factory's own float
    keywords with a non-zero default (a relative step around 0 is no step) and the client /
    server learning rates of the Setup fields it uses."""
    import inspect
    from fedjax_lab.core.setup import Setup as S
    from fedjax_lab.core.sweep import valid_names
    names = valid_names(factory)
    out = {}
    for p in inspect.signature(factory).parameters.values():
        if names.get(p.name, (None, None))[1] is float and isinstance(p.default, float) \
                and not isinstance(p.default, bool) and p.default != 0:
            out[p.name] = p.default
    flat = S().over(getattr(factory, "defaults", S())).describe()
    for name in ("client_lr", "server_lr"):
        if name in names and name in flat:
            out[name] = float(flat[name])
    return out


def hypergrad_registry_data():
    """6 clients of 6..20 examples, 4 features, 3 classes, with test splits (tiny shapes)."""
    from fedjax_lab.data import from_client_lists
    rng = np.random.default_rng(1)
    sizes = [6, 9, 20, 7, 12, 10]
    w = rng.normal(size=(4, 3))
    xs = [rng.normal(size=(n, 4)).astype(np.float32) + 0.3 * k for k, n in enumerate(sizes)]
    ys = [np.argmax(x @ w + rng.normal(size=(len(x), 3)), 1) for x in xs]
    txs = [rng.normal(size=(4, 4)).astype(np.float32) for _ in sizes]
    tys = [np.argmax(x @ w, 1) for x in txs]
    return from_client_lists(xs, ys, test_xs=txs, test_ys=tys, num_classes=3)


def registry_setup(factory) -> Setup:
    """A few clients, a few small steps: the shared values the factory uses, nothing else."""
    uses = getattr(factory, "uses", frozenset({"cohort", "work"}))
    flat = {}
    if "cohort" in uses:
        flat["clients_per_round"] = 3
    if "work" in uses:
        flat.update(local_steps=5, batch_size=4)
    return Setup.of(**flat)


def check_against_finite_differences(name, data, *, rounds=2, rel_step=1e-2, only=None,
                                     fixed=None):
    """(checked {hp: (hypergrad, central difference, its uncertainty)}, refused {hp: message}) of
    algorithm `name` with its default hyperparameters and default model: for each float
    hyperparameter h (or those in `only`), fl.hypergrad either raises a ValueError naming the
    algorithm and h, or returns dL/dh. The central difference D(e) = (L(h + e) - L(h - e)) / 2e,
    L the same program's value (the driver's test_loss, or test_personal_loss, after `rounds`
    rounds), is taken at e = rel_step * h and e / 2 and extrapolated, (4 D(e/2) - D(e)) / 3
    (Richardson: the O(e^2) error cancels; at 5% steps FedMeta's Adam made it 8%); its
    uncertainty, float32 rounding of L and what truncation is left, is |D(e) - D(e/2)| / 3, and
    at least one float32 ulp of L over e / 2 (FedProx's mu at 0.01 moves L by less).
    fixed: {name: value} of other hyperparameters changed from their defaults."""
    from fedjax_lab.algorithms import ALGORITHMS
    factory = ALGORITHMS[name][0]
    args = dict(rounds=rounds, key=0, setup=registry_setup(factory), fixed=fixed)
    checked, refused = {}, {}
    for h, v in float_hyperparameters(factory).items():
        if only is not None and h not in only or h in (fixed or {}):
            continue
        try:
            res = hypergrad(factory, data, wrt={h: v}, **args)
        except ValueError as e:
            assert name in str(e) and h in str(e), f"{name}/{h}: the refusal must name both: {e}"
            refused[h] = str(e)
            continue
        value = lambda x: hypergrad(factory, data, wrt={h: x}, **args).value
        d1, d2 = [(value(v + e) - value(v - e)) / (2 * e) for e in (rel_step * v, rel_step * v / 2)]
        quantum = float(np.spacing(np.float32(res.value))) / (rel_step * v)   # one float32 ulp of L
        checked[h] = (res.grads[h], (4 * d2 - d1) / 3, max(abs(d1 - d2) / 3, quantum))
    return checked, refused


def assert_hypergrads_match(name, checked, rtol=0.02):
    """Each hypergradient within rtol of its central difference, beyond twice the difference's
    own uncertainty u. A derivative lost in float32 rounding (u over a quarter of it) cannot be
    checked to rtol: it must only be as small as the noise, within 4u (FedAMP's dL/dalpha_k at
    its defaults: -2.2e-4 from fl.hypergrad, 0.99e-4 +- 1.2e-4 by differences at -O2, within 2u
    at -O0). At least one derivative must be measurable."""
    measurable = {h: c for h, c in checked.items() if c[2] <= 0.25 * abs(c[1])}
    for h, (g, fd, u) in checked.items():
        k = 2 if h in measurable else 4
        assert abs(g - fd) <= rtol * abs(fd) + k * u, \
            f"{name}: dL/d{h} = {g:.6g} from fl.hypergrad, {fd:.6g} by central differences " \
            f"(uncertainty {u:.2g}{'' if h in measurable else ', below float32 noise'}): " \
            f"expected agreement to {rtol:.0%} + {k} uncertainties"
    assert not checked or measurable, f"{name}: no derivative above float32 noise: {checked}"


@pytest.fixture(scope="module")
def registry_data():
    return hypergrad_registry_data()


def test_fedmeta_maml_inner_lr_matches_finite_differences(registry_data):
    """MAML differentiates through its inner loop, so dL/d alpha is the true derivative (two
    rounds of one inner step: -0.05217 vs -0.05217 extrapolated from central differences; the
    defaults' 3 steps, in the slow registry sweep: -0.1732 vs -0.1732)."""
    checked, refused = check_against_finite_differences("fedmeta_maml", registry_data,
                                                        only={"inner_lr"}, rounds=2,
                                                        fixed={"inner_steps": 1})
    assert not refused and set(checked) == {"inner_lr"}
    g, fd, uncertainty = checked["inner_lr"]
    assert abs(fd) > 1e-2 and uncertainty < 0.05 * abs(fd)    # a derivative there to match
    assert_hypergrads_match("fedmeta_maml", checked)


@pytest.mark.parametrize("name, hp", [("perfedavg_hf", "inner_lr"), ("perfedavg_fo", "client_lr"),
                                      ("fedmeta_fomaml", "inner_lr"), ("signsgd", "client_lr")])
def test_a_stop_gradient_on_the_path_is_refused_before_compiling(name, hp, registry_data):
    """perfedavg_hf's dL/d inner_lr came out exactly 0 (finite differences: +0.15) and FOMAML's
    biased (-0.0115 vs -0.0108): the stop_gradient lies on the path, so they are refused, naming
    the algorithm and the hyperparameter, before anything is traced."""
    from fedjax_lab.algorithms import ALGORITHMS
    factory = ALGORITHMS[name][0]
    with count_compiles() as compiles:
        with pytest.raises(ValueError, match=rf"wrt: {name} cannot be differentiated with respect "
                                             rf"to '{hp}': .*stop_gradient|sign"):
            hypergrad(factory, registry_data, wrt={hp: 0.1}, rounds=1, key=0,
                      setup=registry_setup(factory))
    assert compiles == []


@pytest.mark.parametrize("name, flat, match", [
    ("fedavg", dict(aggregator="median"), "fedavg aggregates with 'median'"),
    ("mediansgd", {}, "mediansgd aggregates with 'median'"),
    ("fedavg", dict(uplink="top_k", uplink_k=5), "fedavg sends through the 'top_k' uplink")])
def test_a_non_smooth_aggregator_or_uplink_is_refused_before_compiling(name, flat, match,
                                                                      registry_data):
    """medianSGD's client_lr: -0.0191 from reverse mode vs -0.0157 by central differences (the
    median's client switches inside the step); any algorithm with such an aggregator or uplink
    is refused."""
    from fedjax_lab.algorithms import ALGORITHMS
    setup = Setup.of(clients_per_round=3, **flat)
    ALGORITHMS[name][0](MODEL, setup=setup)       # building may compile tiny constants once
    with count_compiles() as compiles:
        with pytest.raises(ValueError, match=rf"wrt: \['client_lr'\]: {match}"):
            hypergrad(ALGORITHMS[name][0], registry_data, wrt={"client_lr": 0.1}, rounds=1, key=0,
                      setup=setup, model=MODEL)     # the built model: no models.get sample op
    assert compiles == []


def test_a_hyperparameter_traced_where_a_number_is_needed_names_the_algorithm(registry_data):
    from fedjax_lab.algorithms import fedmeta_maml
    with pytest.raises(ValueError, match=r"wrt: \['support_fraction'\]: fedmeta_maml needs one of "
                                         r"them as a Python number"):
        hypergrad(fedmeta_maml, registry_data, wrt={"support_fraction": 0.3}, rounds=1, key=0,
                  setup=registry_setup(fedmeta_maml))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(__import__("fedjax_lab.algorithms").algorithms.ALGORITHMS))
def test_every_registered_hypergradient_is_right_or_refused(name, registry_data):
    """For every registered algorithm with its defaults and default model, each float
    hyperparameter's fl.hypergrad equals central finite differences to 2%, or is refused with a
    ValueError naming the algorithm and the hyperparameter."""
    checked, refused = check_against_finite_differences(name, registry_data)
    assert_hypergrads_match(name, checked)
