"""models.from_nnx: the same MLP written in linen and in nnx, from the same initial parameters,
trains to the same numbers under FedAvg and (with BatchNorm) under FedBN; train/eval mode and
dropout rngs; init by key from a factory; `--model package.module:attr`."""
import chex
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fedjax_lab as fl
from fedjax_lab.models.base import dense_dot_general
from fedjax_lab.models.linear import MLP, MLPBN

HIDDEN = (8, 6)


def Linear(a, b, rngs):
    """nnx.Linear with the zoo's dense_dot_general (models.base.Dense's): same sums as linen's."""
    return nnx.Linear(a, b, dot_general=_dot_general, rngs=rngs)


def _dot_general(x, w, dimension_numbers, precision=None, out_sharding=None, **kw):
    return dense_dot_general(x, w, dimension_numbers, precision=precision, **kw)


class NnxMLP(nnx.Module):
    """models.linear.MLP / MLPBN in nnx: Dense -> [BatchNorm ->] ReLU per hidden layer."""

    def __init__(self, in_features, num_classes, hidden=HIDDEN, batch_norm=False, dropout=0.0, *,
                 rngs):
        dims = (in_features,) + tuple(hidden)
        self.hidden_layers = nnx.List([Linear(a, b, rngs)
                                       for a, b in zip(dims[:-1], dims[1:])])
        self.norms = nnx.List([nnx.BatchNorm(h, momentum=0.9, rngs=rngs) for h in hidden]
                              if batch_norm else [])
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.out = Linear(dims[-1], num_classes, rngs)

    def features(self, x):
        z = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.hidden_layers):
            z = layer(z)
            z = nnx.relu(self.norms[i](z) if len(self.norms) else z)
        return self.drop(z)

    def head(self, z):
        return self.out(z)

    def __call__(self, x):
        return self.head(self.features(x))


class LinenMLP(linen.Module):
    """A linen module class for `--model tests.test_nnx:LinenMLP`."""
    num_classes: int

    @linen.compact
    def __call__(self, x, train: bool = False):
        return linen.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def nnx_bn_factory(num_classes, sample_x, hidden=HIDDEN):
    """A factory for `--model tests.test_nnx:nnx_bn_factory`: (num_classes, sample_x) -> module."""
    return NnxMLP(int(np.prod(sample_x.shape[1:])), num_classes, hidden, batch_norm=True,
                  rngs=nnx.Rngs(0))


def to_nnx_layout(linen_params):
    """{"hidden_layers_0": ..., "norms_1": ...} -> {"hidden_layers": {0: ...}, "norms": {1: ...}}"""
    out = {}
    for k, v in linen_params.items():
        head, _, idx = k.rpartition("_")
        if head in ("hidden_layers", "norms"):
            out.setdefault(head, {})[int(idx)] = v
        else:
            out[k] = v
    return out


def nnx_twin(linen_model, data, batch_norm):
    """An nnx module holding the linen model's initial parameters (key 0), and those params."""
    linen_init = linen_model.init(jax.random.key(0), data.x[:1])
    module = NnxMLP(int(np.prod(data.x.shape[1:])), data.num_classes, batch_norm=batch_norm,
                    rngs=nnx.Rngs(123))
    want = ({c: to_nnx_layout(v) for c, v in linen_init.items()} if batch_norm
            else to_nnx_layout(linen_init))
    if batch_norm:
        p, s = nnx.state(module, nnx.Param), nnx.state(module, nnx.BatchStat)
        nnx.replace_by_pure_dict(p, want["params"])
        nnx.replace_by_pure_dict(s, want["batch_stats"])
        nnx.update(module, p, s)
    else:
        p = nnx.state(module, nnx.Param)
        nnx.replace_by_pure_dict(p, want)
        nnx.update(module, p)
    return module, want


@pytest.fixture(scope="module")
def digits():
    return fl.data.load("digits:iid,clients=8,domains=4", seed=0)


SETUP = dict(clients_per_round=4, local_steps=3, batch_size=5, client_lr=0.1)


def run_rounds(alg, data, rounds=3):
    state, fn = alg.init(jax.random.key(0), data), jax.jit(alg.round)
    losses = []
    for r in range(rounds):
        state, metrics = fn(state, data, jax.random.key(10 + r))
        losses.append(float(metrics["local_loss"]))
    return state, losses


def test_fedavg_linen_and_nnx_mlp_train_to_the_same_numbers(digits):
    linen_model = fl.models.from_linen(MLP(digits.num_classes, HIDDEN), "mlp")
    module, want = nnx_twin(linen_model, digits, batch_norm=False)
    nnx_model = fl.models.from_nnx(module)
    chex.assert_trees_all_equal(nnx_model.init(jax.random.key(5), digits.x[:1]), want)
    setup = fl.Setup.of(**SETUP)
    algs = [fl.algorithms.fedavg(m, setup=setup) for m in (linen_model, nnx_model)]
    (s_linen, loss_linen), (s_nnx, loss_nnx) = [run_rounds(a, digits) for a in algs]
    np.testing.assert_allclose(loss_nnx, loss_linen, rtol=1e-5)
    trained, trained_linen = algs[1].global_params(s_nnx), algs[0].global_params(s_linen)
    chex.assert_trees_all_close(trained, to_nnx_layout(trained_linen), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(trained["out"]["kernel"] - want["out"]["kernel"]).max()) > 1e-3  # it moved
    x = digits.x[:7]
    chex.assert_trees_all_close(nnx_model.apply(trained, x), linen_model.apply(trained_linen, x),
                                rtol=1e-5, atol=1e-5)


def test_fedbn_linen_mlp_bn_and_nnx_batch_norm_mlp_agree(digits):
    linen_model = fl.models.from_linen(MLPBN(digits.num_classes, HIDDEN), "mlp_bn")
    module, want = nnx_twin(linen_model, digits, batch_norm=True)
    nnx_model = fl.models.from_nnx(module)
    assert nnx_model.update_state is not None
    chex.assert_trees_all_equal(nnx_model.init(jax.random.key(0), digits.x[:1]), want)
    setup = fl.Setup.of(**SETUP)
    algs = [fl.algorithms.fedbn(m, setup=setup) for m in (linen_model, nnx_model)]
    (s_linen, loss_linen), (s_nnx, loss_nnx) = [run_rounds(a, digits) for a in algs]
    np.testing.assert_allclose(loss_nnx, loss_linen, rtol=1e-5)
    ids = jnp.arange(digits.num_clients)
    linen_rows = algs[0].client_params(s_linen, ids)
    nnx_rows = algs[1].client_params(s_nnx, ids)
    as_nnx = {c: to_nnx_layout(v) for c, v in linen_rows.items()}
    chex.assert_trees_all_close(nnx_rows, as_nnx, rtol=1e-5, atol=1e-6)
    # FedBN kept BatchNorm local: running means differ across clients that trained, and moved
    means = np.asarray(nnx_rows["batch_stats"]["norms"][0]["mean"])
    assert np.abs(means).max() > 1e-3 and np.ptp(means, axis=0).max() > 1e-3
    # eval mode normalizes by the running statistics, train mode by the batch
    p0 = jax.tree.map(lambda a: a[0], nnx_rows)
    l0 = jax.tree.map(lambda a: a[0], linen_rows)
    x = digits.x[:9]
    for train in (False, True):
        chex.assert_trees_all_close(nnx_model.apply(p0, x, train=train),
                                    linen_model.apply(l0, x, train=train), rtol=1e-5, atol=1e-5)
    assert not np.allclose(nnx_model.apply(p0, x, train=True), nnx_model.apply(p0, x))


def test_dropout_uses_the_rng_argument_and_eval_mode_is_deterministic(digits):
    model = fl.models.from_nnx(NnxMLP(64, 10, dropout=0.5, rngs=nnx.Rngs(0)))
    params = model.init(None, digits.x[:1])
    x = digits.x[:16]
    a, b = (model.apply(params, x, train=True, rng=jax.random.key(k)) for k in (1, 2))
    chex.assert_trees_all_equal(a, model.apply(params, x, train=True, rng=jax.random.key(1)))
    assert not np.allclose(a, b)
    eval_out = model.apply(params, x)
    chex.assert_trees_all_equal(eval_out, model.apply(params, x, train=False, rng=jax.random.key(2)))
    assert not np.allclose(a, eval_out)
    # features/head split: apply == head o features
    chex.assert_trees_all_close(model.head(params, model.features(params, x)), eval_out, rtol=1e-6)


def test_a_factory_inits_by_key_and_import_paths_build_models(digits):
    model = fl.models.from_nnx(lambda rngs: NnxMLP(64, 10, rngs=rngs))
    p1, p2 = (model.init(jax.random.key(k), digits.x[:1]) for k in (1, 2))
    chex.assert_trees_all_equal_shapes(p1, p2)
    assert not np.allclose(p1["out"]["kernel"], p2["out"]["kernel"])
    chex.assert_trees_all_equal(p1, model.init(jax.random.key(1), digits.x[:1]))

    cls = fl.models.get("tests.test_nnx:NnxMLP", 10, digits.x[:1], hidden=(5,))
    assert cls.init(jax.random.key(0), digits.x[:1])["hidden_layers"][0]["kernel"].shape == (64, 5)
    fac = fl.models.get("tests.test_nnx:nnx_bn_factory", 10, (8, 8, 1))
    assert set(fac.init(None, digits.x[:1])) == {"params", "batch_stats"}
    lin = fl.models.get("tests.test_nnx:LinenMLP", 10, digits.x[:1])
    assert lin.apply(lin.init(jax.random.key(0), digits.x[:1]), digits.x[:3]).shape == (3, 10)
    assert lin.init(jax.random.key(0), digits.x[:1])["Dense_0"]["kernel"].shape == (64, 10)

    with pytest.raises(ValueError, match="cannot import 'Nope' from 'tests.test_nnx'"):
        fl.models.get("tests.test_nnx:Nope", 10, digits.x[:1])
    with pytest.raises(ValueError, match="maps examples of shape"):
        fl.models.get("tests.test_nnx:bad_factory", 10, digits.x[:1])


def test_the_driver_runs_an_nnx_model_twice(digits):
    """The driver donates the state it is handed: init must give fresh buffers every time."""
    fac = fl.models.get("tests.test_nnx:nnx_bn_factory", 10, digits.x[:1])
    alg = fl.algorithms.fedbn(fac, setup=fl.Setup.of(**SETUP))
    runs = [fl.run(alg, digits, rounds=2, key=0, eval_every=2, progress=False) for _ in range(2)]
    assert runs[0].history == runs[1].history and np.isfinite(runs[0].history[-1]["train_loss"])


@pytest.mark.slow
def test_driver_checkpoints_and_resumes_an_nnx_model(digits, tmp_path):
    """Checkpoints of params whose keys include nnx.List's integer indices, resumed exactly."""
    fac = fl.models.get("tests.test_nnx:nnx_bn_factory", 10, digits.x[:1])
    alg = fl.algorithms.fedbn(fac, setup=fl.Setup.of(**SETUP))
    kw = dict(key=0, eval_every=2, progress=False)
    fl.run(alg, digits, rounds=2, out=str(tmp_path), checkpoint_every=2, **kw)
    resumed = fl.run(alg, digits, rounds=4, out=str(tmp_path), checkpoint_every=2, resume=True, **kw)
    fresh = fl.run(alg, digits, rounds=4, **kw)
    assert resumed.history == fresh.history
    ids = jnp.arange(digits.num_clients)
    chex.assert_trees_all_equal(alg.client_params(resumed.state, ids),
                                alg.client_params(fresh.state, ids))


def bad_factory(num_classes, sample_x):
    return NnxMLP(int(np.prod(sample_x.shape[1:])), num_classes + 1, rngs=nnx.Rngs(0))
