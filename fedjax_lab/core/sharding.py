"""The client axis across devices and hosts: a one-axis `Mesh` named 'clients'.

A round is one XLA program over client-stacked arrays; spreading it over devices only needs the
client axis of the per-round arrays to carry a sharding. With a mesh in effect
(`jax.set_mesh(mesh)`, which `run(..., mesh=mesh)` does for you):

* `participate` (core/rounds.py) pads the sampled set to a multiple of the mesh's 'clients' size
  with zero-weight dummy clients (see `pad_clients`) and constrains ids, batches, step masks and
  client sizes to `P('clients')` (`shard_clients`).
* XLA's SPMD partitioner propagates that sharding through the vmapped local training: device d
  trains clients [d*C/D, (d+1)*C/D) against its own replica of the flat data, and the weighted mean
  over clients becomes a local partial sum plus one all-reduce.
* Server state and the flat federated data are replicated (`replicate`); per-client rows of stateful
  algorithms (`ClientRows.rows`, [N, ...]) are split along 'clients' when D divides N.

Without a mesh (or with no 'clients' axis in it) every function here is the identity, so results
on one device are bit-for-bit those of the unsharded code.

Many hosts: call `jax.distributed.initialize(...)` in every process, build
`client_mesh()` over `jax.devices()` (all processes' devices) and call `run(..., mesh=mesh)` with
the same data and key in every process; JAX's multi-controller runtime runs the one program on all
devices. `replicate` / `shard_rows` build global arrays from host values (each process puts the
shards of its own devices, `jax.make_array_from_single_device_arrays`), so every process must hold
the same host data. On CPU, collectives across processes need
`jax.config.update('jax_cpu_collectives_implementation', 'gloo')` before initialization
(`experiments/multihost.py` launches such a run on localhost).

For algorithm authors: under a mesh the round sees C' >= C clients. Weights from `client_weights`
are already 0 for the dummies; a per-client metric averaged with weight 1 should use
`Participation.valid` as its weight, and per-client state is gathered with clamping
(`rows[ids]`) and scattered with dropping (`.at[ids].set`), which ignores the dummy id N.

Known limits: the flat data arrays are replicated on every device rather than split by client
(a client's batches are gathered from the local replica, so no data moves during a round; data
larger than one device's memory needs a per-device client layout, not done here). Evaluation runs
replicated. The 'clients' axis must be `AxisType.Auto` (explicit-sharding meshes are refused).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from fedjax_lab.core.client_state import ClientRows

CLIENTS = "clients"


def client_mesh(devices: Optional[Sequence] = None) -> Mesh:
    """A one-axis mesh named 'clients' over `devices` (default: all devices of all processes).

    The axis is `AxisType.Auto`: shardings are hints for XLA's partitioner, so algorithm code is
    written as for one device and never sees per-device shapes.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must be a non-empty list of jax devices, got an empty list")
    return jax.make_mesh((len(devices),), (CLIENTS,), axis_types=(AxisType.Auto,), devices=devices)


def use_mesh(mesh: Optional[Mesh]):
    """`jax.set_mesh(mesh)` as a context manager, or nothing when mesh is None."""
    if mesh is None:
        return contextlib.nullcontext()
    check_mesh(mesh)
    return jax.set_mesh(mesh)


def check_mesh(mesh) -> None:
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh (e.g. client_mesh()), got "
                         f"{type(mesh).__name__}")
    if CLIENTS not in mesh.axis_names:
        raise ValueError(f"mesh must have an axis named '{CLIENTS}', got axes {mesh.axis_names}")
    axis_type = dict(zip(mesh.axis_names, mesh.axis_types))[CLIENTS]
    if axis_type != AxisType.Auto:
        raise ValueError(f"mesh's '{CLIENTS}' axis must be AxisType.Auto (XLA partitions the round), "
                         f"got {axis_type}; build it with client_mesh() or jax.make_mesh(..., "
                         "axis_types=(AxisType.Auto,))")


def num_client_shards() -> int:
    """Size of the 'clients' axis of the mesh in effect (inside or outside jit); 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or CLIENTS not in mesh.axis_names:
        return 1
    return int(mesh.shape[CLIENTS])


def padded_size(num: int, shards: Optional[int] = None) -> int:
    """`num` rounded up to a multiple of the number of client shards."""
    shards = num_client_shards() if shards is None else shards
    return int(math.ceil(num / shards) * shards)


def shard_clients(tree):
    """Constrain the leading (client) axis of every leaf to the mesh's 'clients' axis.

    The identity without a mesh. Scalars are left alone; leaves whose leading axis does not divide
    evenly are still legal (XLA pads internally) but `participate` pads the round's clients first.
    """
    if num_client_shards() == 1:
        return tree
    return jax.tree.map(
        lambda x: x if jnp.ndim(x) == 0 else jax.lax.with_sharding_constraint(x, P(CLIENTS)), tree)


def pad_clients(tree, size: int, fill):
    """Pad every leaf's leading axis to `size` rows with `fill` (a pytree of scalars like `tree`)."""
    def pad(x, f):
        extra = size - x.shape[0]
        if extra < 0:
            raise ValueError(f"size={size} is smaller than the client axis ({x.shape[0]})")
        if extra == 0:
            return x
        return jnp.concatenate([x, jnp.full((extra,) + x.shape[1:], f, x.dtype)])
    return jax.tree.map(pad, tree, fill)


def replicate(tree, mesh: Mesh):
    """Every leaf as a global array replicated on all devices of `mesh` (all processes).

    Each process passes its own, identical, host value. PRNG key arrays are supported.
    """
    return jax.tree.map(lambda x: _global(x, NamedSharding(mesh, P())), tree)


def shard_rows(tree, mesh: Mesh):
    """Every leaf split along its leading axis over 'clients' where the mesh size divides it
    (replicated otherwise). Each process passes the full, identical, host value."""
    size = mesh.shape[CLIENTS]

    def put(x):
        spec = P(CLIENTS) if np.ndim(x) and np.shape(x)[0] % size == 0 else P()
        return _global(x, NamedSharding(mesh, spec))
    return jax.tree.map(put, tree)


def place_state(state, mesh: Mesh):
    """An algorithm's state on `mesh`: per-client rows (ClientRows.rows) sharded, the rest
    replicated."""
    if isinstance(state, ClientRows):
        return ClientRows(server=replicate(state.server, mesh), rows=shard_rows(state.rows, mesh))
    return replicate(state, mesh)


def _global(x, sharding: NamedSharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(_global(jax.random.key_data(x), sharding), impl=impl)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)     # already global: a reshard is a collective
    host = np.asarray(x)
    index = sharding.addressable_devices_indices_map(host.shape)
    local = {d: host[i] for d, i in index.items()}
    arrays = [jax.device_put(local[d], d) for d in sharding.addressable_devices]
    return jax.make_array_from_single_device_arrays(host.shape, sharding, arrays)
