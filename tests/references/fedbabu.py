"""FedBABU (Oh, Kim, Yun, ICLR 2022, Algorithm 1) on the zoo's MLP, client by client: every
client starts from the global model, takes plain SGD steps on the body only (the head "out" stays
at its random initialization) and sends the body's update; the server averages it by n_k
(tests/references/fedper.py's round with no rows and the head frozen). Every client deploys the
global model (the fine-tuning is evaluation's, alg.adapt)."""
import jax
import numpy as np

from tests.references._common import broadcast
from tests.references.fedper import HEAD, partial_round

MODEL = {"fedbabu": "mlp"}


def body_only(step, name):
    return name != HEAD


def fedbabu(alg, data, state, key):
    w = jax.tree.map(np.asarray, alg.global_params(state))
    w, _ = partial_round(alg, data, w, None, key, local="head", trains=body_only)
    return {"global": w, "clients": broadcast(w, data.num_clients), "rtol": 1e-4, "atol": 1e-5}


REFERENCE = {"fedbabu": fedbabu}
