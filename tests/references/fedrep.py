"""FedRep (Collins et al., ICML 2021, Algorithm 1) on the zoo's MLP, client by client: client k
starts from (phi^t, h_k), takes head_steps (None: local_steps // 2) plain SGD steps on its head
"out" (body fixed), then its remaining real steps on the body (the new head fixed), keeps its
head and sends the body's update; the server averages it by n_k (tests/references/fedper.py's
round with a phase rule)."""
from tests.references.fedper import HEAD, deployed, partial_round, split

import jax
import numpy as np

MODEL = {"fedrep": "mlp"}


def phases(head_steps):
    return lambda step, name: (name == HEAD) == (step < head_steps)


def head_steps(alg):
    """The config's head_steps, None: half of local_steps rounded down."""
    h = alg.config["head_steps"]
    return alg.setup.work.local_steps // 2 if h is None else h


def fedrep(alg, data, state, key):
    w = jax.tree.map(np.asarray, alg.global_params(state))
    rows = [split(w, "head")[1]] * data.num_clients
    w, rows = partial_round(alg, data, w, rows, key, local="head",
                            trains=phases(head_steps(alg)))
    return {"global": w, "clients": deployed(w, rows, "head"), "rtol": 1e-4, "atol": 1e-5}


REFERENCE = {"fedrep": fedrep}
