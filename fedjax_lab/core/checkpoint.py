"""Orbax checkpoints of the algorithm state plus the run's config, for exact resumption."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


def manager(out: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(out, "checkpoints")), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state, meta: dict):
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           meta=ocp.args.JsonSave(meta)))
    mgr.wait_until_finished()


def latest_step(mgr: ocp.CheckpointManager):
    return mgr.latest_step()


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict:
    """The saved meta of checkpoint `step` alone (to check it before restoring the state)."""
    return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(mgr: ocp.CheckpointManager, step: int, like):
    """State restored with the structure, shapes and dtypes of `like`, and the saved meta."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    got = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                    meta=ocp.args.JsonRestore()))
    return jax.tree.map(_as_placed_like, got["state"], like), got["meta"]


def _as_placed_like(x, like):
    """A restored leaf placed as `like` was. Orbax puts every array on its device explicitly
    (committed), and a committed argument is another jit cache entry than init's uncommitted one:
    without this, the first resumed chunk compiled the round and evaluation programs again."""
    if not (isinstance(x, jax.Array) and isinstance(like, jax.Array)) or like.committed \
            or like.aval.weak_type or len(x.sharding.device_set) != 1:
        return x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(np.asarray(jax.random.key_data(x)),
                                        impl=jax.random.key_impl(x))
    return jnp.asarray(np.asarray(x))


def config_diff(saved: dict, now: dict, *, ignore=("rounds", "command")) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k}: checkpoint has {saved.get(k, '<missing>')!r}, this run has {now.get(k, '<missing>')!r}"
            for k in keys if k not in ignore and _norm(saved.get(k)) != _norm(now.get(k))]


def _norm(v):
    return json.loads(json.dumps(v))
