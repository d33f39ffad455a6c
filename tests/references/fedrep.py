"""FedRep (Collins et al., ICML 2021, Algorithm 1) on the zoo's MLP, client by client: client k
starts from (phi^t, h_k), takes head_steps plain SGD steps on its head "out" (body fixed), then its
remaining real steps on the body (the new head fixed), keeps its head and sends the body's
update; the server averages it by n_k (tests/references/fedper.py's round with a phase rule)."""
from tests.references.fedper import HEAD, deployed, partial_round, split

import jax
import numpy as np

MODEL = {"fedrep": "mlp"}
SETUP = {"fedrep": {"local_steps": 12}}


def phases(head_steps):
    return lambda step, name: (name == HEAD) == (step < head_steps)


def fedrep(alg, data, state, key):
    w = jax.tree.map(np.asarray, alg.global_params(state))
    rows = [split(w, "head")[1]] * data.num_clients
    w, rows = partial_round(alg, data, w, rows, key, local="head",
                            trains=phases(alg.config["head_steps"]))
    return {"global": w, "clients": deployed(w, rows, "head"), "rtol": 1e-4, "atol": 1e-5}


REFERENCE = {"fedrep": fedrep}
