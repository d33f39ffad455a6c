"""FedJAX 0.0.17's `fed_avg.federated_averaging` on the peers' workload.

Run by experiments/bench_peers.py in the `fedjax` venv (fedjax 0.0.17 on jax/jaxlib 0.5.3: FedJAX
calls `jax.tree_map`, gone from jax 0.6; dm-haiku and optax as the resolver picks them under that
pin, their versions printed with the result):
    python experiments/peers/run_fedjax.py WORKLOAD_DIR

Built as FedJAX's own examples build FedAvg: the model from a haiku `hk.Linear(10)` through
`fedjax.create_model_from_haiku` with the per-example cross-entropy, `fedjax.model_grad(model)`,
client `fedjax.optimizers.sgd(0.05)`, server `sgd(1.0)`, and the algorithm's `apply(state,
clients)` with the default (jit) `for_each_client` backend: a host loop over clients and over
their batches, one jitted SGD step per batch, weights n_k (= len(client dataset)). The common
schedule is followed by handing each client a `ClientDataset` of its round's 20 x 10 rows in
order, batched by FedJAX's `ShuffleRepeatBatchHParams(batch_size=10, num_steps=20,
skip_shuffle=True)` (its per-batch host gather stays in the round). Per round, outside FedJAX, one
numpy gather of all clients' rows and one `jax.random.split` of the client keys: nothing per
client beyond what FedJAX itself does.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fedjax        # noqa: E402
import haiku as hk   # noqa: E402
import jax           # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np   # noqa: E402
from fedjax.algorithms import fed_avg  # noqa: E402

import common        # noqa: E402


def make_model(dim):
    forward = hk.transform(lambda batch: hk.Linear(10)(batch["x"]))
    sample = {"x": np.zeros((1, dim), np.float32), "y": np.zeros((1,), np.int32)}
    return fedjax.create_model_from_haiku(
        forward, sample,
        train_loss=lambda batch, preds: fedjax.metrics.unreduced_cross_entropy_loss(batch["y"], preds))


def run(wl, C):
    S, B = wl["local_steps"], wl["batch_size"]
    model = make_model(wl["dim"])
    alg = fed_avg.federated_averaging(
        fedjax.model_grad(model), fedjax.optimizers.sgd(wl["client_lr"]),
        fedjax.optimizers.sgd(wl["server_lr"]),
        fedjax.ShuffleRepeatBatchHParams(batch_size=B, num_steps=S, num_epochs=None,
                                         skip_shuffle=True))
    state = alg.init({"linear": {"w": jnp.asarray(wl["w0"]), "b": jnp.asarray(wl["b0"])}})
    X, Y = wl["x"], wl["y"].astype(np.int32)
    timer = common.Timer()
    for r in range(wl["rounds"]):
        ids, idx = wl["ids"][C][r], wl["idx"][C][r].reshape(C, S * B)
        with timer:
            xr, yr = X[idx], Y[idx]
            rngs = np.asarray(jax.random.split(jax.random.PRNGKey(r), C))
            clients = [(int(k), fedjax.ClientDataset({"x": xr[j], "y": yr[j]}), rngs[j])
                       for j, k in enumerate(ids)]
            state, _ = alg.apply(state, clients)
            jax.block_until_ready(state.params)
    return timer, state.params["linear"]["w"], state.params["linear"]["b"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload")
    ap.add_argument("--threads", type=int, help="unused (XLA picks its own pool)")
    args = ap.parse_args(argv)
    wl = common.load(args.workload)
    version = (f"fedjax {md.version('fedjax')}, jax {jax.__version__}, "
               f"dm-haiku {md.version('dm-haiku')}, optax {md.version('optax')}")
    for C in wl["cohorts"]:
        timer, w, b = run(wl, C)
        common.emit(wl, system="fedjax", version=version, C=C, timer=timer, w=w, b=b)


if __name__ == "__main__":
    main()
