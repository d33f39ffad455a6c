"""core/hetero.py: architecture groups against a per-client loop (mixed cohorts, a group with no
sampled client, duplicates), one trace per group and one compilation for many rounds, per-client
evaluation with each client's own architecture, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import models
from fedjax_lab.core import hetero
from fedjax_lab.core.types import Model
from tests.conftest import count_compiles

WIDTHS = (3, 5, 7)
N = 7
GROUP_OF = np.array([0, 1, 2, 1, 0, 2, 1])


def arch():
    return hetero.architectures([models.mlp(3, hidden=(h, 4)) for h in WIDTHS], GROUP_OF)


class Data:       # the two fields init_rows / check read
    num_clients = N
    x = jnp.ones((1, 6))


def data_xy(seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(10, 6)), jnp.float32),
            jnp.asarray(rng.integers(0, 3, 10), jnp.int32))


def client_fn(a, x, y, traces=None):
    """One full-batch gradient step on the client's scaled data; sends its loss and features."""
    def fn(g, row, args):
        if traces is not None:
            traces[g] += 1
        scale = args
        m = a.models[g]
        loss = lambda p: jnp.mean(m.loss(m.apply(p, x * scale), y))
        l, grad = jax.value_and_grad(loss)(row)
        new = jax.tree.map(lambda p, g_: p - 0.1 * g_, row, grad)
        return new, (l, m.features(new, x[:2] * scale))
    return fn


def _jitted_step(m):
    """One client's full-batch step and features under `m`, jitted (one small program per
    architecture: eager flax compiles op by op, minutes on 2 cores), no vmap, no hetero."""
    def step(p, x, y, scale):
        loss = lambda q: jnp.mean(m.loss(m.apply(q, x * scale), y))
        l, grad = jax.value_and_grad(loss)(p)
        new = jax.tree.map(lambda q, g_: q - 0.1 * g_, p, grad)
        return new, l, m.features(new, x[:2] * scale)
    return jax.jit(step)


def reference(a, rows, ids, scales, x, y):
    """Plain loop over the cohort: each client's own row, no vmap (a client drawn twice computes
    the same update twice from its row at the start of the round)."""
    steps = [_jitted_step(m) for m in a.models]
    start = rows
    rows = [jax.tree.map(np.array, r) for r in rows]
    slot = a.slot_of(N)
    losses, feats = [], []
    for c, i in enumerate(np.asarray(ids)):
        g = int(GROUP_OF[i])
        m = a.models[g]
        p = jax.tree.map(lambda r: jnp.asarray(r[slot[i]]), start[g])
        new, l, f = steps[g](p, x, y, jnp.float32(scales[c]))
        for r, v in zip(jax.tree.leaves(rows[g]), jax.tree.leaves(new)):
            r[slot[i]] = np.asarray(v)
        losses.append(float(l))
        feats.append(np.asarray(f))
    return rows, np.array(losses), np.stack(feats)


@pytest.mark.parametrize("ids, distinct", [
    pytest.param([0, 1, 2, 3, 4, 5, 6], True, marks=pytest.mark.slow),       # everyone
    ([5, 3, 1, 6], True),                  # no client of group 0 (its branch is skipped)
    pytest.param([2, 2, 4, 2], False, marks=pytest.mark.slow),  # one device drawn three times
])
def test_map_groups_equals_per_client_loop(ids, distinct):
    a = arch()
    x, y = data_xy()
    rows = hetero.init_rows(a, jax.random.key(0), Data)
    ids = jnp.asarray(ids, jnp.int32)
    scales = 0.5 + 0.1 * ids.astype(jnp.float32)      # per client, so copies of one agree
    new_rows, (loss, feats) = jax.jit(lambda r, i, s: hetero.map_groups(
        a, client_fn(a, x, y), r, i, s, num_clients=N, distinct=distinct))(rows, ids, scales)
    ref_rows, ref_loss, ref_feats = reference(a, rows, ids, np.asarray(scales), x, y)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(feats, ref_feats, rtol=1e-5, atol=1e-6)
    for g in range(3):
        for got, want in zip(jax.tree.leaves(new_rows[g]), jax.tree.leaves(ref_rows[g])):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    untouched = [i for i in range(N) if i not in set(np.asarray(ids).tolist())]
    slot = a.slot_of(N)
    for i in untouched:       # rows of clients not in the cohort are bit-identical
        g = GROUP_OF[i]
        for got, old in zip(jax.tree.leaves(new_rows[g]), jax.tree.leaves(rows[g])):
            np.testing.assert_array_equal(got[slot[i]], old[slot[i]])


def test_each_group_traced_once_and_compiled_once_for_many_rounds():
    a = arch()
    x, y = data_xy()
    traces = [0, 0, 0]
    fn = client_fn(a, x, y, traces)
    step = jax.jit(lambda r, i: hetero.map_groups(a, fn, r, i, jnp.ones(i.shape), num_clients=N,
                                                  distinct=True,
                                                  out_shape=(jax.ShapeDtypeStruct((), jnp.float32),
                                                             jax.ShapeDtypeStruct((2, 4), jnp.float32))))
    rows = hetero.init_rows(a, jax.random.key(0), Data)
    cohorts = [jnp.asarray(np.array(c, np.int32))            # mixes; [1, 3, 6] lacks groups 0, 2
               for c in ([0, 1, 2], [3, 5, 6], [1, 3, 6], [4, 0, 2])]
    with count_compiles() as compiles:
        for ids in cohorts:
            rows, _ = step(rows, ids)
    assert traces == [1, 1, 1]          # each architecture's client function traced once
    assert len(compiles) == 1, compiles  # one XLA program for every round and cohort
    assert step._cache_size() == 1


def test_group_rule_blocks_and_slots():
    a = hetero.architectures([models.mlp(3, hidden=(h,)) for h in WIDTHS], "blocks")
    np.testing.assert_array_equal(a.group_ids(20), [0] * 7 + [1] * 7 + [2] * 6)  # the code's 7/7/6
    np.testing.assert_array_equal(a.slot_of(20)[[0, 6, 7, 13, 14, 19]], [0, 6, 0, 6, 0, 5])
    b = arch()
    np.testing.assert_array_equal(b.slot_of(N), [0, 0, 0, 1, 1, 1, 2])
    assert [m.tolist() for m in b.members(N)] == [[0, 4], [1, 3, 6], [2, 5]]


@pytest.mark.slow
def test_init_rows_are_each_clients_own_init():
    a = arch()
    rows = hetero.init_rows(a, jax.random.key(3), Data)
    for i in range(N):
        g, s = GROUP_OF[i], a.slot_of(N)[i]
        want = a.models[g].init(jax.random.fold_in(jax.random.key(3), i), Data.x)
        for got, w in zip(jax.tree.leaves(rows[g]), jax.tree.leaves(want)):
            np.testing.assert_array_equal(got[s], w)


@pytest.mark.slow
def test_group_sums_each_client_with_its_own_model(tiny_data):
    a = hetero.architectures([models.mlp(3, hidden=(h,)) for h in (2, 5)], [0, 1, 1, 0, 1])
    rows = hetero.init_rows(a, jax.random.key(0), tiny_data)

    def predict(g, row, x, y, _):
        logits = a.models[g].apply(row, x)
        return a.models[g].loss(logits, y), jnp.argmax(logits, -1) == y

    l, c, n = jax.jit(lambda r: hetero.group_sums(a, r, tiny_data.test, predict, num_clients=5))(rows)
    for i in range(5):
        g, s = a.group_ids(5)[i], a.slot_of(5)[i]
        p = jax.tree.map(lambda r: r[s], rows[g])
        x, y = tiny_data.test.client(i)
        logits = np.asarray(a.models[g].apply(p, x))
        np.testing.assert_allclose(l[i], np.asarray(a.models[g].loss(logits, y)).sum(), rtol=1e-5)
        assert c[i] == (logits.argmax(-1) == np.asarray(y)).sum()
        assert n[i] == len(y)
    acc = hetero.client_accuracy(np.array([1., 3., 0.]), np.array([2., 4., 0.]))
    np.testing.assert_allclose(acc["per_client"], [0.5, 0.75])      # client 3 has no test data
    assert acc["mean"] == pytest.approx(0.625) and acc["std"] == pytest.approx(0.125)


def test_bad_input():
    mlps = [models.mlp(3, hidden=(h,)) for h in WIDTHS]
    with pytest.raises(ValueError, match=r"group_of must lie in \[0, 3\).*group_of\[2\] = 3"):
        hetero.architectures(mlps, [0, 1, 3])
    with pytest.raises(ValueError, match=r"group_of must lie in \[0, 3\).*= -1"):
        hetero.architectures(mlps, [-1, 1, 2])
    with pytest.raises(ValueError, match="group_of must be one of"):
        hetero.architectures(mlps, "random")
    with pytest.raises(ValueError, match="group_of must be a non-empty 1-D integer"):
        hetero.architectures(mlps, [0.5, 1.0])
    with pytest.raises(ValueError, match="models must be a Model or a non-empty sequence"):
        hetero.architectures([], "blocks")
    with pytest.raises(ValueError, match="group_of must give one group id per client: it has 3"):
        hetero.architectures(mlps, [0, 1, 2]).check(Data)
    with pytest.raises(ValueError, match=r"group_of: group\(s\) \[2\]"):
        hetero.architectures(mlps, [0, 1, 0, 1, 0, 1, 0]).check(Data)
    bare = Model(init=lambda k, x: {"w": jnp.zeros((x.shape[-1], 3))},
                 apply=lambda p, x, train=False, rng=None: x @ p["w"], name="bare")
    with pytest.raises(ValueError, match=r"model: fedproto needs models with a features / head "
                                         r"split.*model 1 \('bare'\)"):
        hetero.require_split(hetero.architectures([mlps[0], bare], "blocks"), "fedproto")
