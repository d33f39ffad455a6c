"""FedPer (Arivazhagan et al. 2019) on the zoo's MLP, client by client, and the pieces the other
body/head references share (lg_fedavg, fedrep, fedbabu): the MLP's forward pass written out
(z = relu(z W_l + b_l) per hidden layer, logits = z W_out + b_out: "out" is the head), its mean
softmax cross-entropy, plain SGD in float64 with gradients by jax.grad (unjitted), and the round of
FedAvg with one part of the model kept per client (a row): client k starts from (shared part of w,
its row), trains, keeps its local part and sends its shared part's update; the server adds the
n_k-weighted mean of those updates times the server lr."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tests.references._common import participation

MODEL = {"fedper": "mlp"}
HEAD = "out"


def forward(p, x):
    z = x.reshape(x.shape[0], -1)
    for name in sorted((k for k in p if k.startswith("hidden_layers_")), key=lambda k: int(k[14:])):
        z = jax.nn.relu(z @ p[name]["kernel"] + p[name]["bias"])
    return z @ p[HEAD]["kernel"] + p[HEAD]["bias"]


def loss(p, x, y):
    logits = forward(p, x)
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[jnp.arange(len(y)), y])


def split(p, local):
    """(shared, local part) of an MLP params dict; local = "head" or "body"."""
    head = {k: v for k, v in p.items() if k == HEAD}
    body = {k: v for k, v in p.items() if k != HEAD}
    return (body, head) if local == "head" else (head, body)


def plain_sgd(alg):
    opt = alg.setup.client_opt
    assert (opt.name, opt.momentum, opt.lr_schedule) == ("sgd", 0.0, "constant"), opt
    server = alg.setup.server_opt
    assert (server.name, server.momentum) == ("sgd", 0.0), server
    return opt.lr, server.lr


def sgd(p, x, y, idx, mask, lr, trains=lambda s, name: True):
    """Plain SGD over the steps s with mask[s]; the real step j (0, 1, ...) moves only the
    modules `name` with trains(j, name)."""
    grad = jax.grad(loss)
    j = 0
    for s in np.nonzero(mask)[0]:
        g = grad(p, x[idx[s]], y[idx[s]])
        p = {k: (jax.tree.map(lambda a, b: a - lr * b, v, g[k]) if trains(j, k) else v)
             for k, v in p.items()}
        j += 1
    return p


def weight(alg, part, c):
    reported = part["mask"][c].sum() > 0 and not (alg.config["drop_stragglers"]
                                                 and part["is_straggler"][c])
    if not reported:
        return 0.0
    return part["num_examples"][c] if alg.setup.cohort.weighting == "examples" else 1.0


def partial_round(alg, data, w, rows, key, *, local, trains=lambda s, name: True):
    """One round from the global params w and the rows (list over all clients; None: no rows,
    every client starts from w); returns (w, rows). float64."""
    part = participation(alg, data, key)
    lr, server_lr = plain_sgd(alg)
    with jax.enable_x64(True):
        f64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)
        w, rows = f64(w), None if rows is None else list(f64(rows))
        x, y = np.asarray(data.x, np.float64), np.asarray(data.y)
        sums, total = None, 0.0
        for c, k in enumerate(part["ids"]):                    # reference loop over clients
            shared = split(w, local)[0]
            p = {**shared, **(rows[k] if rows is not None else split(w, local)[1])}
            p = sgd(p, x, y, part["idx"][c], part["mask"][c], lr, trains)
            n_k = weight(alg, part, c)
            if n_k == 0:
                continue
            if rows is not None:
                rows[k] = split(p, local)[1]
            delta = {m: jax.tree.map(lambda a, b: n_k * (np.asarray(a) - b), p[m], shared[m])
                     for m in shared}
            sums = delta if sums is None else jax.tree.map(np.add, sums, delta)
            total += n_k
        if total > 0:
            w = {**w, **{m: jax.tree.map(lambda a, d: a + server_lr * d / total, w[m], sums[m])
                         for m in sums}}
        back = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float32), t)
        return back(w), None if rows is None else back(rows)


def deployed(w, rows, local):
    """[N, ...] stacked (shared part of w, row_k)."""
    clients = [{**split(w, local)[0], **r} for r in rows]
    return jax.tree.map(lambda *a: np.stack(a), *clients)


def personalized(local):
    def reference(alg, data, state, key):
        w = jax.tree.map(np.asarray, alg.global_params(state))
        rows = [split(w, local)[1]] * data.num_clients
        w, rows = partial_round(alg, data, w, rows, key, local=local)
        return {"global": w, "clients": deployed(w, rows, local), "rtol": 1e-4, "atol": 1e-5}
    return reference


REFERENCE = {"fedper": personalized("head")}
