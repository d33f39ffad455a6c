"""Model zoo: parameter counts, output shapes, apply == head o features, vmap over stacked
client parameters, dropout keyed per client and per step, GroupNorm's independence of the batch,
and `models.get`'s errors."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab import Setup, models
from fedjax_lab.core.local import local_train
from fedjax_lab.core.tree import tree_num_params
from fedjax_lab.core.types import batch_loss
from fedjax_lab.models.resnet import ResNet

KEY = jax.random.key(0)


def _count(model, shape, dtype=jnp.float32):
    return tree_num_params(jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct((1,) + shape, dtype)))


# (factory, kwargs, example shape, dtype, count): the counts written in the docstrings.
PAPER_COUNTS = [
    (models.logistic, dict(num_classes=10), (60,), jnp.float32, 610),
    (models.mlp, dict(num_classes=10), (784,), jnp.float32, 199_210),
    (models.cnn, dict(num_classes=10), (28, 28, 1), jnp.float32, 1_663_370),
    (models.cnn_cifar, dict(num_classes=10), (32, 32, 3), jnp.float32, 878_538),
    (models.cnn_cifar, dict(num_classes=100), (32, 32, 3), jnp.float32, 924_708),
    (models.cnn_cifar, dict(num_classes=10), (28, 28, 1), jnp.float32, 582_026),
    (models.resnet8, dict(num_classes=10), (32, 32, 3), jnp.float32, 78_042),
    (models.resnet, dict(num_classes=10, depth=20), (32, 32, 3), jnp.float32, 272_474),
    (models.char_lstm, dict(num_classes=80), (80,), jnp.int32, 817_872),
    (models.char_gru, dict(num_classes=80), (80,), jnp.int32, 619_216),
]


@pytest.mark.parametrize("factory,kwargs,shape,dtype,count", PAPER_COUNTS,
                         ids=lambda v: getattr(v, "__name__", None))
def test_parameter_counts_match_docstrings(factory, kwargs, shape, dtype, count):
    assert _count(factory(**kwargs), shape, dtype) == count
    import sys
    module_doc = sys.modules[factory.__module__].__doc__
    assert f"{count:,}" in (factory.__doc__ or "") + module_doc


def test_fedavg_cnn_count_is_the_papers_layer_by_layer():
    params = jax.eval_shape(models.cnn(10).init, KEY, jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))
    per_layer = {k: tree_num_params(v) for k, v in params.items()}
    assert per_layer == {"conv1": 832, "conv2": 51_264, "fc1": 1_606_144, "fc": 5_130}


# Tiny configurations: (name, model, x) with a batch of 3 examples.
def _cases():
    rng = np.random.default_rng(0)
    img = lambda *s: jnp.asarray(rng.normal(size=(3,) + s), jnp.float32)
    return [
        ("logistic", models.logistic(4), img(6)),
        ("mlp", models.mlp(4, hidden=(8, 5)), img(6)),
        ("cnn", models.cnn(4), img(12, 12, 1)),
        ("cnn_dropout", models.cnn(4, dropout=0.5), img(12, 12, 1)),
        ("cnn_cifar", models.cnn_cifar(4), img(20, 20, 3)),
        ("resnet8", models.resnet8(4), img(8, 8, 3)),
        ("char_lstm", models.char_lstm(7, hidden_size=16), jnp.asarray(rng.integers(0, 7, (3, 5)))),
        ("char_gru", models.char_gru(7, hidden_size=16), jnp.asarray(rng.integers(0, 7, (3, 5)))),
    ]


CASES = _cases()
IDS = [c[0] for c in CASES]
_JITTED = {}


def _random_params(model, x, seed=0):
    """Params with init's structure and fan-in scaled normal values, drawn on the host: compiling
    flax's initializers costs seconds per model on CPU, and these tests need no particular init."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, KEY, x[:1])
    std = lambda s: 1.0 / np.sqrt(np.prod(s[:-1])) if len(s) > 1 else 0.1
    return jax.tree.map(lambda v: jnp.asarray(std(v.shape) * rng.normal(size=v.shape), v.dtype),
                        shapes)


def _jitted(model):
    """(init, outputs) jitted once per model: the tests below share their compilations."""
    if model not in _JITTED:
        def outputs(params, x, k):
            z = model.features(params, x)
            return (model.apply(params, x), z, model.head(params, z),
                    model.apply(params, x, train=True, rng=k),
                    model.head(params, model.features(params, x, train=True, rng=k)))
        _JITTED[model] = (functools.partial(_random_params, model), jax.jit(outputs))
    return _JITTED[model]


@pytest.mark.parametrize("name,model,x", CASES, ids=IDS)
def test_output_shape_and_head_of_features_is_apply(name, model, x):
    init, outputs = _jitted(model)
    params = init(x)
    logits, z, head_z, train_logits, train_head_z = outputs(params, x, jax.random.key(3))
    num_classes = 7 if name.startswith("char") else 4
    chex.assert_shape(logits, (3, num_classes))
    assert np.all(np.isfinite(np.asarray(logits)))
    assert model.features is not None and model.head is not None
    assert z.ndim == 2 and z.shape[0] == 3
    chex.assert_trees_all_close(head_z, logits, atol=1e-5, rtol=1e-5)
    # also in training mode, with the same dropout key
    chex.assert_trees_all_close(train_head_z, train_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,model,x", CASES, ids=IDS)
def test_vmap_over_stacked_client_params_matches_a_loop(name, model, x):
    clients = 3
    init, outputs = _jitted(model)
    per_client = [init(x, seed) for seed in range(clients)]
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *per_client)
    xs = jnp.stack([jnp.roll(x, c, axis=0) for c in range(clients)])   # [C, B, ...]
    out = jax.jit(jax.vmap(lambda p, v: model.apply(p, v)))(stacked, xs)
    for c in range(clients):   # one client at a time, no vmap
        np.testing.assert_allclose(out[c], outputs(per_client[c], xs[c], KEY)[0], atol=1e-5,
                                   rtol=1e-5)
    assert not np.allclose(out[0], out[1])   # different clients' params give different outputs


def test_logistic_features_are_the_flattened_input():
    x = jnp.arange(12.0).reshape(2, 2, 3)
    model = models.logistic(3)
    params = model.init(KEY, x)
    np.testing.assert_array_equal(model.features(params, x), x.reshape(2, 6))
    assert set(params) == {"Dense_0"}   # the whole model is its head


def _case(name):
    _, model, x = CASES[IDS.index(name)]
    init, outputs = _jitted(model)
    return model, x, init(x), outputs


def test_dropout_uses_the_rng_and_only_in_training():
    model, x, params, outputs = _case("cnn_dropout")
    logits, z, _, a, _ = outputs(params, x, jax.random.key(1))
    logits2, _, _, a_again, _ = outputs(params, x, jax.random.key(1))
    _, _, _, b, _ = outputs(params, x, jax.random.key(2))
    np.testing.assert_array_equal(a, a_again)
    assert not np.allclose(a, b)                    # a different key drops different units
    assert not np.allclose(a, logits)               # training mode drops, evaluation does not
    np.testing.assert_array_equal(logits, logits2)  # evaluation ignores the key
    z_train = model.features(params, x, train=True, rng=jax.random.key(1))
    dropped = float(jnp.mean((z_train == 0) & (z != 0)) / jnp.mean(z != 0))
    assert 0.35 < dropped < 0.65                    # about half of the active units, rate 0.5
    _, _, plain_params, plain = _case("cnn")
    no_dropout_eval, _, _, no_dropout_train, _ = plain(plain_params, x, jax.random.key(1))
    np.testing.assert_array_equal(no_dropout_eval, no_dropout_train)


def test_dropout_is_keyed_per_client_and_per_step_in_local_training():
    """vmap(local_train) over clients == a plain loop over clients and steps (no jit, no vmap)
    that calls the model with fold_in(client_key, step)."""
    model = models.cnn(3, dropout=0.5)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 8))
    params = _random_params(model, x)
    lr, steps, clients = 0.1, 3, 2
    # both clients see the same batches from the same start: only their dropout keys differ
    idx = jnp.asarray(np.repeat(rng.integers(0, 8, (1, steps, 2)), clients, axis=0))
    mask = jnp.ones((clients, steps), bool)
    keys = jax.random.split(jax.random.key(7), clients)
    train = local_train(model, optax.sgd(lr))
    res = jax.jit(jax.vmap(train, in_axes=(None, None, None, 0, 0, 0)))(params, x, y, idx, mask, keys)

    grad = jax.jit(jax.grad(lambda p, xb, yb, k: batch_loss(model, p, xb, yb, k)))
    for c in range(clients):
        w = params
        for s in range(steps):
            rows = idx[c, s]
            g = grad(w, x[rows], y[rows], jax.random.fold_in(keys[c], s))
            w = jax.tree.map(lambda p, gi: p - lr * gi, w, g)
        chex.assert_trees_all_close(jax.tree.map(lambda v: v[c], res.params), w, atol=1e-5, rtol=1e-5)

    assert not np.allclose(res.params["fc"]["kernel"][0], res.params["fc"]["kernel"][1])


def test_resnet_groupnorm_has_no_batch_statistics():
    model, x, params, outputs = _case("resnet8")
    logits, _, _, train_logits, _ = outputs(params, x, KEY)
    # one example's logits do not depend on the rest of the batch (BatchNorm's would)
    other = x.at[1:].set(5.0 * x[1:] + 1.0)
    np.testing.assert_allclose(outputs(params, other, KEY)[0][0], logits[0], atol=1e-5)
    np.testing.assert_allclose(train_logits, logits, atol=1e-6)   # no train/eval difference
    names = {str(p[-2].key) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert any(n.startswith("GroupNorm") for n in names)
    assert not any("BatchNorm" in n for n in names)
    module = ResNet(4)
    variables = jax.eval_shape(lambda: module.init(KEY, x[:1], train=True))
    assert set(variables) == {"params"}                           # no batch_stats collection


def test_char_rnn_reads_the_whole_sequence():
    model, x, params, outputs = _case("char_lstm")
    changed_first = x.at[:, 0].set((x[:, 0] + 1) % 7)
    assert not np.allclose(outputs(params, x, KEY)[0], outputs(params, changed_first, KEY)[0])


def test_get_builds_by_name_with_options():
    m = models.get("cnn", 10, jnp.zeros((1, 28, 28, 1)), dropout=0.25)
    assert m.name == "cnn"
    assert models.get("resnet", 10, (32, 32, 3), depth=14).name == "resnet14"
    assert models.get("char_gru", 80, np.zeros((2, 80), np.int32)).name == "char_gru"
    assert models.get("logistic", 10).name == "logistic"
    assert set(models.MODELS) >= {"logistic", "mlp", "cnn", "cnn_cifar", "resnet8", "char_lstm",
                                  "char_gru"}


@pytest.mark.parametrize("args,kwargs,match", [
    (("cnnn", 10), {}, r"unknown model 'cnnn'; valid models: \[.*'cnn'"),
    (("cnn", 10), dict(dropuot=0.5), r"unknown option.*dropuot.*valid options: \['dropout'\]"),
    (("cnn", 0), {}, "num_classes must be > 0"),
    (("cnn", 10), dict(dropout=1.0), r"dropout must lie in \[0, 1\)"),
    (("cnn", 10, (28, 28)), {}, r"input_shape.*\[height, width, channels\].*channel axis"),
    (("cnn", 10, np.zeros((1, 784), np.float32)), {}, r"sample.*\[height, width, channels\]"),
    (("cnn", 10, np.zeros((0, 28, 28, 1), np.float32)), {}, "non-empty batch"),
    (("cnn", 10, np.zeros((1, 28, 28, 1), np.int32)), {}, "floating-point inputs"),
    (("cnn_cifar", 10, (8, 8, 1)), {}, r"input_shape: model 'cnn_cifar' cannot take examples of shape \(8, 8, 1\)"),
    (("char_lstm", 80, np.zeros((1, 80), np.float32)), {}, "integer token ids"),
    (("resnet", 10), dict(depth=10), r"depth must be 6n \+ 2"),
    (("resnet8", 10), dict(num_groups=3), "num_groups must divide"),
    (("char_lstm", 80), dict(hidden_size=0), "hidden_size must be > 0"),
    (("char_rnn_typo", 80), {}, "unknown model"),
    (("mlp", 10, (-1,)), {}, "input_shape must be a tuple of positive ints"),
])
def test_bad_input_raises_value_error_naming_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.get(*args, **kwargs)


def test_char_rnn_cell_must_be_known():
    with pytest.raises(ValueError, match=r"cell must be one of \['gru', 'lstm'\]"):
        models.char_rnn(80, cell="rnn")


@pytest.mark.slow
def test_resnet8_groupnorm_trains_under_fedavg_on_digits():
    """GroupNorm needs no statistics to average: FedAvg trains ResNet-8 like any other model.
    Measured: 0.88 test accuracy after 4 rounds, 0.93 after 8 (chance 0.10)."""
    from fedjax_lab import run
    from fedjax_lab.algorithms import fedavg
    from fedjax_lab.data import load
    data = load("digits:iid,clients=10", seed=0)
    alg = fedavg(models.get("resnet8", 10, data.x[:1]), setup=Setup.of(
        clients_per_round=5, local_steps=10, batch_size=10, client_lr=0.1))
    assert run(alg, data, rounds=8, key=0, eval_every=8, progress=False).history[-1][
        "test_accuracy"] > 0.85


@pytest.mark.slow
@pytest.mark.parametrize("name", ["char_lstm", "char_gru"])
def test_char_rnn_learns_a_task_that_needs_memory_under_fedavg(name):
    """Label = the token 3 steps before the end: any model without memory stays at chance (0.10).
    Measured after 20 rounds: LSTM 0.87, GRU 0.90."""
    from fedjax_lab import run
    from fedjax_lab.algorithms import fedavg
    from fedjax_lab.data import from_client_lists
    rng = np.random.default_rng(0)
    V, T = 10, 8
    xs = [rng.integers(0, V, (300, T)) for _ in range(8)]
    txs = [rng.integers(0, V, (20, T)) for _ in range(8)]
    data = from_client_lists(xs, [x[:, T - 3] for x in xs], test_xs=txs,
                             test_ys=[x[:, T - 3] for x in txs], num_classes=V)
    alg = fedavg(models.get(name, V, data.x[:1], hidden_size=32), setup=Setup.of(
        clients_per_round=4, local_steps=20, batch_size=10, client_optimizer="adam",
        client_lr=0.03))
    assert run(alg, data, rounds=20, key=0, eval_every=20, progress=False).history[-1][
        "test_accuracy"] > 0.75


def test_quadratic_init_fixes_the_starting_point():
    sample = np.zeros((1, 3), np.float32)
    default = models.quadratic(3).init(KEY, sample)["x"]
    assert default.dtype == jnp.float32 and np.array_equal(default, np.zeros(3, np.float32))
    assert np.array_equal(models.quadratic().init(KEY, sample)["x"], default)   # dim from the sample
    x0 = np.array([-2.0, 0.5, 7.0])
    for model in (models.quadratic(3, init=x0), models.quadratic(init=x0)):
        for key in (KEY, jax.random.key(9)):                       # fixed: the key is ignored
            got = model.init(key, sample)["x"]
            assert got.dtype == jnp.float32 and got.shape == (3,)
            np.testing.assert_array_equal(got, x0.astype(np.float32))
    np.testing.assert_array_equal(models.quadratic(3, init=1.5).init(KEY, sample)["x"], [1.5] * 3)
    # the loss at x_0 is 1/2 ||x_0 - a||^2 (apply is unchanged)
    m = models.quadratic(3, init=x0)
    a = np.array([[1.0, 1.0, 1.0]], np.float32)
    loss = m.loss(m.apply(m.init(KEY, sample), a), None)
    np.testing.assert_allclose(loss, [0.5 * np.sum((x0 - a[0]) ** 2)], rtol=1e-6)


@pytest.mark.parametrize("kwargs,sample_shape,match", [
    (dict(dim=3, init=np.zeros(2)), None, r"init must be a scalar or an array of shape \(3,\), got shape \(2,\)"),
    (dict(dim=3, init=np.zeros((3, 1))), None, r"init must be a scalar or an array of shape \(3,\)"),
    (dict(init=np.zeros(2)), (1, 4), r"init must be a scalar or an array of shape \(4,\), got shape \(2,\)"),
    (dict(dim=2, init=[0.0, np.nan]), None, "init must be finite"),
])
def test_quadratic_bad_init_names_the_argument(kwargs, sample_shape, match):
    with pytest.raises(ValueError, match=match):
        models.quadratic(**kwargs).init(KEY, np.zeros(sample_shape, np.float32))


# --- the convolution with a loop-friendly backward pass (issue 12, models/base.py) ---------------

from jax import lax  # noqa: E402

from fedjax_lab.models.base import conv_general_dilated  # noqa: E402

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("size,kernel,stride,padding", [
    (9, 5, 1, "SAME"), (9, 5, 1, "VALID"), (8, 3, 2, "SAME"), (9, 3, 2, "SAME"), (8, 1, 2, "SAME"),
    (10, 3, 2, "VALID"), (7, 3, 1, ((2, 0), (1, 3)))])
def test_fast_conv_value_and_gradients_equal_jaxs(size, kernel, stride, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, size, size, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 3, 4)), jnp.float32)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, (stride, stride), padding,
                                                 dimension_numbers=NHWC)))
    np.testing.assert_allclose(loss(conv_general_dilated)(x, w), loss(lax.conv_general_dilated)(x, w),
                               rtol=1e-6)
    ours = jax.grad(loss(conv_general_dilated), (0, 1))(x, w)
    jaxs = jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w)
    for a, b in zip(ours, jaxs):
        assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) < 1e-5


@pytest.mark.parametrize("kw", [dict(rhs_dilation=(2, 2)), dict(lhs_dilation=(2, 1)),
                                dict(feature_group_count=3)])
def test_fast_conv_falls_back_to_lax_for_dilated_and_grouped(kw):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 3 // kw.get("feature_group_count", 1), 6)), jnp.float32)
    loss = lambda conv: lambda x, w: jnp.sum(jnp.sin(conv(x, w, (1, 1), ((1, 1), (1, 1)),
                                                          dimension_numbers=NHWC, **kw)))
    for a, b in zip(jax.grad(loss(conv_general_dilated), (0, 1))(x, w),
                    jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _eqns(jaxpr, primitive, out):
    """every equation of `primitive` in `jaxpr` and the jaxprs nested in it (scan, custom_vjp...)"""
    for e in jaxpr.eqns:
        if e.primitive.name == primitive:
            out.append(e)
        for v in e.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _eqns(inner, primitive, out)
    return out


def _convs(jaxpr, out):
    return out + [e.params["dimension_numbers"] for e in _eqns(jaxpr, "conv_general_dilated", [])]


@pytest.mark.parametrize("factory", [models.cnn, models.cnn_cifar])
def test_cnn_backward_uses_only_channel_last_convolutions(factory):
    # jax's own transpose rules compute the weight gradient as a convolution with batch and feature
    # dims swapped, which XLA:CPU runs ~44x slower inside a lax.scan (experiments/PERF_CNN.md)
    model = factory(10)
    x, y = jnp.ones((2, 16, 16, 1)), jnp.zeros(2, jnp.int32)
    params = model.init(KEY, x)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.mean(model.loss(model.apply(p, x), y))))(params)
    dns = _convs(jaxpr.jaxpr, [])
    canonical = lax.conv_dimension_numbers(x.shape, (5, 5, 1, 32), NHWC)
    assert len(dns) == 6 and all(d == canonical for d in dns)   # forward, dx, dw of two layers


class _PlainCNN(nn.Module):
    """The FedAvg CNN written with flax's stock nn.Conv (jax's own convolution gradients)."""
    padding: str

    def setup(self):
        self.conv1 = nn.Conv(32, (5, 5), padding=self.padding)
        self.conv2 = nn.Conv(64, (5, 5), padding=self.padding)
        self.fc1 = nn.Dense(512)
        self.fc = nn.Dense(10)

    def __call__(self, x):
        pool = lambda z: nn.max_pool(z, (2, 2), strides=(2, 2))
        z = pool(nn.relu(self.conv1(x)))
        z = pool(nn.relu(self.conv2(z)))
        return self.fc(nn.relu(self.fc1(z.reshape(z.shape[0], -1))))


@pytest.mark.parametrize("factory,padding", [(models.cnn, "SAME"), (models.cnn_cifar, "VALID")])
def test_cnn_training_in_a_scan_equals_stock_flax_convolutions(factory, padding):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((20, 16, 16, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 20))
    idx = jnp.asarray(rng.integers(0, 20, (3, 4)), jnp.int32)
    model, plain = factory(10), _PlainCNN(padding)
    params = model.init(KEY, x[:1])
    out = local_train(model, optax.sgd(0.1))(params, x, y, idx, jnp.ones(3, bool), KEY)
    step = jax.jit(lambda p, xb, yb: jax.tree.map(lambda a, b: a - 0.1 * b, p, jax.grad(
        lambda q: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
            plain.apply({"params": q}, xb), yb)))(p)))
    p = params
    for rows in idx:
        p = step(p, x[rows], y[rows])
    for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(p)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cnn_gradients_vmapped_over_stacked_clients_equal_stock_flax():
    # the custom backward pass under vmap (clients as batched rows: accelerators, chunks of a map)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 3, 12, 12, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, (2, 3)))
    model, plain = models.cnn(10), _PlainCNN("SAME")
    stacked = jax.vmap(lambda k: model.init(k, x[0, :1]))(jax.random.split(KEY, 2))
    ours = jax.vmap(jax.grad(lambda p, xb, yb: jnp.mean(model.loss(model.apply(p, xb), yb))))(
        stacked, x, y)
    for c in range(2):
        p = jax.tree.map(lambda a: a[c], stacked)
        want = jax.grad(lambda q: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
            plain.apply({"params": q}, x[c]), y[c])))(p)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(want)):
            np.testing.assert_allclose(a[c], b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factory,padding,size", [(models.cnn, "SAME", 8), (models.cnn_cifar, "VALID", 16)])
def test_cnn_gradients_equal_stock_flax_on_real_digits_with_tied_background(factory, padding, size):
    # real 8x8 digits have constant zero backgrounds, so pooling windows hold exactly tied maxima
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = np.asarray(digits.images[:16], np.float32)[..., None] / 16.0
    x = jnp.asarray(np.pad(x, ((0, 0), (0, size - 8), (0, size - 8), (0, 0))))
    y = jnp.asarray(digits.target[:16])
    model, plain = factory(10), _PlainCNN(padding)
    params = model.init(KEY, x[:1])
    params = jax.tree.map(lambda a: a + 0.05, params)     # positive biases: positive ties
    ours = jax.jit(jax.grad(lambda p: jnp.mean(model.loss(model.apply(p, x), y))))(params)
    want = jax.jit(jax.grad(lambda q: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        plain.apply({"params": q}, x), y))))(params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


from fedjax_lab.models import base as models_base  # noqa: E402


@pytest.mark.parametrize("lead,d,h", [((10,), 60, 10), ((3, 4), 7, 5), ((16,), 64, 64),   # outer path
                                      ((32,), 60, 10), ((10,), 784, 200)])               # lax's dot
def test_dense_kernel_gradient_is_x_transpose_g(lead, d, h):
    """dL/dW = sum over rows of x_r g_r^T and dL/dx = g W^T, written out in numpy (float64);
    vmapped over clients too."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3,) + lead + (d,)).astype(np.float32)
    w = rng.standard_normal((3, d, h)).astype(np.float32)
    c = rng.standard_normal((3,) + lead + (h,)).astype(np.float32)     # dL/dy for L = sum(c * y)
    dims = (((len(lead),), (0,)), ((), ()))
    loss = lambda x, w, c: jnp.sum(c * models_base.dense_dot_general(x, w, dims))
    gx, gw = jax.vmap(jax.grad(loss, (0, 1)))(x, w, c)
    rows = int(np.prod(lead))
    for k in range(3):
        xr, cr = x[k].reshape(-1, d).astype(np.float64), c[k].reshape(-1, h).astype(np.float64)
        np.testing.assert_allclose(gw[k], xr.T @ cr, rtol=1e-5, atol=1e-5 * rows)
        np.testing.assert_allclose(gx[k], (cr @ w[k].T.astype(np.float64)).reshape(lead + (d,)),
                                   rtol=1e-5, atol=1e-5 * h)
    y = jax.vmap(lambda x, w: models_base.dense_dot_general(x, w, dims))(x, w)
    ref = np.einsum("k...d,kdh->k...h", x.astype(np.float64), w.astype(np.float64))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6 * d * np.abs(ref).max())
    outer = (jax.default_backend() == "cpu" and rows <= models_base.OUTER_MAX_ROWS
             and d * h <= models_base.OUTER_MAX_KERNEL)
    jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(x[0], w[0], c[0])
    assert _row_contractions(jaxpr) == (0 if outer else 1)


def _row_contractions(jaxpr):
    """dots that contract over the rows (x^T g): jax's kernel gradient; the outer-product path has none"""
    return sum(e.params["dimension_numbers"][0][0] == tuple(range(e.invars[0].aval.ndim - 1))
               and e.invars[0].aval.ndim > 1 and e.params["dimension_numbers"][0][0] !=
               (e.invars[0].aval.ndim - 1,) for e in _eqns(jaxpr.jaxpr, "dot_general", []))


def test_zoo_dense_layers_use_the_fast_kernel_gradient():
    model = models.logistic(10)
    x, y = jnp.ones((10, 60)), jnp.zeros(10, jnp.int32)
    params = model.init(KEY, x)
    grad = jax.grad(lambda p: jnp.mean(model.loss(model.apply(p, x), y)))
    assert _row_contractions(jax.make_jaxpr(grad)(params)) == (0 if jax.default_backend() == "cpu" else 1)
