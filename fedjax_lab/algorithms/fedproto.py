"""FedProto (Tan, Long, Liu, Zhou, Lu, Jiang, Zhang, "FedProto: Federated Prototype Learning across
Heterogeneous Clients", AAAI 2022, Algorithm 1).

No model parameters travel. Client i, with representation f_i (its model's `features`) and its
own head, computes a prototype of every class j it holds, D_{i,j} its class-j examples:

    C_i^(j) = 1/|D_{i,j}| sum_{(x, y) in D_{i,j}} f_i(x)                                   (Eq. 5)

and uploads {C_i^(j)} with the counts |D_{i,j}|. The server's global prototype of class j
averages over the clients N_j that hold it:

    C-bar^(j) = 1/|N_j| sum_{i in N_j} C_i^(j)       aggregation="mean" (default, the code)
    C-bar^(j) = sum_i |D_{i,j}| C_i^(j) / sum_i |D_{i,j}|   aggregation="weighted" (Eq. 6's intent)

(Eq. 6 writes |D_{i,j}|/N_j inside the 1/|N_j| sum, a count weighting whose normalization does not
give a mean; the weighted mean is what it intends: the pooled mean of all class-j features. The
official code, lib/utils.proto_aggregation, averages unweighted over holders.) Classes that no
client of the round holds have no global prototype that round (the code rebuilds the global
prototypes from each round's uploads), and contribute nothing below.

Local objective, per batch B of client i (the code's and the appendix's per-sample form,
proto_loss="sample", default; d(a, b) = mean_k (a_k - b_k)^2, torch's MSELoss):

    L_i = 1/|B| sum_{(x, y) in B} [ CE(head_i(f_i(x)), y) + lam * 1[C-bar^(y) exists] d(f_i(x), C-bar^(y)) ]

proto_loss="prototype" is the paper's Eq. 8 prototype-level form: lam * sum_j d(C_i^(j)(B),
C-bar^(j)) over the classes j of the batch that have a global prototype, C_i^(j)(B) the batch's
class-j mean feature. lam = 0 is local training (each client alone): the "Local" row of Table 1.

Inference (both reported by `evaluate`): by the client's own head (`*_personal_*` metrics), and
by the nearest global prototype among the classes the client holds (`*_proto_*`):
y-hat = argmin_{j in classes(i), C-bar^(j) exists} d(f_i(x), C-bar^(j)). Accuracy is per client,
each client's own correct / count, then mean +- std over clients as in Table 1 (the official
test_inference_new_het_lt never resets its correct/total counters between clients, nor between
its head and prototype passes, so each client's number there is a running average over the
clients before it: not copied).

Heterogeneous models (core/hetero.py): `model` may be a sequence of Models with `group_of`, e.g.
the FedProto-mh CNNs with 18 / 20 / 22 conv2 channels and the same feature width. The
prototypes must have one dimension across groups (checked).

Decisions (paper vs. official code, yuetan031/FedProto):
  * When C_i^(j) is computed (`prototypes`):
      "after_training" (default): one pass after local training, the trained model in inference
        mode over all of the client's training examples: the prototypes of the model the client
        deploys, the same for any batch order.
      "last_epoch": collected inside the training loop, as the paper's Algorithm 1 does (the
        prototypes come out of the local updates) and the code does (lib/update.py,
        update_weights_het: the per-class lists are reset at the start of every local epoch, so
        only the last epoch's survive; each batch's features are those of the forward pass of
        its loss, i.e. under the parameters before that batch's optimizer step, in training mode,
        dropout included; the client's prototype is their per-class mean, lib/utils.agg_func).
        Here: C_i^(j) is the mean of f_i(x) over the class-j examples among the last n_i stream
        positions client i trained on (core/batching.py lays a client's E epochs out as one
        stream of E shuffled passes; its last batch is topped up from the stream start), each
        under the pre-step parameters of its step, with that step's rng. Without stragglers in
        epochs mode this is exactly the last pass E over the client's n_i examples (a batch that
        straddles passes E-1 and E contributes only its pass-E examples; the top-up positions
        beyond E n_i do not count); a straggler's is its last n_i trained examples; in steps mode
        (local_steps) the last n_i of its local_steps * B examples (all of them if fewer). Where
        these positions need not hold every example (shuffle="replacement", steps mode) a class
        drawn only earlier has no prototype from that client this round. The counts |D_{i,j}|
        sent up are the class-j counts of those positions. The code's DataLoader drops each
        epoch's last incomplete batch (drop_last=True), so its last epoch sees floor(n_i/B) B
        examples; our schedule trains on every example (not copied). Cost: one more forward pass
        of f_i per step (core/local.py's step_stats hook, same params and rng as the loss's).
  * Every client trains every round (Algorithm 1; the code has no sampling): the default when
    `setup.cohort` is not given. A `Cohort` samples clients instead (their rows only change).
  * Local optimizer: SGD, lr 0.01, momentum 0.5 (the code's), its state restarted every round
    (the code builds a new optimizer per round); one local epoch, batch 8 by default.
  * n-way k-shot data: `data.partition.nway_kshot`.
bytes_up per client: its held classes' prototypes, counts and class ids ((4 d + 8) bytes each);
bytes_down: the global prototypes and class ids ((4 d + 4) bytes per class that has one).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_lab.extend import (ClientRows, Cohort, HeteroAlgorithm, LocalWork, Model, Optimizer,
                               Setup, begin_round, client_keys, defaults, hetero, local_train,
                               resolve, summarize, validate)

FEDPROTO = Setup(work=LocalWork(batch_size=8, epochs=1),
                 client_opt=Optimizer("sgd", lr=0.01, momentum=0.5))
AGGREGATIONS = ("mean", "weighted")
PROTO_LOSSES = ("sample", "prototype")
PROTOTYPES = ("after_training", "last_epoch")


@struct.dataclass
class ProtoServer:
    protos: jax.Array     # [K, d] global prototypes C-bar^(j)
    has: jax.Array        # [K] bool: class j has a global prototype
    round: jax.Array


def sq_dist(a, b):
    """d(a, b) = mean_k (a_k - b_k)^2 over the last axis (torch's MSELoss per row)."""
    return jnp.mean(jnp.square(a - b), axis=-1)


def prototype_penalty(z, y, protos, has, *, form: str):
    """lam's factor: the per-sample or the prototype-level distance term (module docstring)."""
    if form == "sample":
        return jnp.mean(sq_dist(z, protos[y]) * has[y])
    onehot = jax.nn.one_hot(y, protos.shape[0], dtype=z.dtype)       # [B, K]
    counts = onehot.sum(0)
    batch_protos = (onehot.T @ z) / jnp.maximum(counts, 1.0)[:, None]
    return jnp.sum(sq_dist(batch_protos, protos) * ((counts > 0) & has))


def class_sums(z, y, w, num_classes):
    """(sum_b w_b 1[y_b = j] z_b [K, d], sum_b w_b 1[y_b = j] [K]): the per-class feature sums and
    counts of Eq. 5, examples weighted by w [B] (0: not counted)."""
    onehot = jax.nn.one_hot(y, num_classes, dtype=z.dtype) * w[:, None]
    return onehot.T @ z, onehot.sum(0)


def client_prototypes(model, params, x, y, rows, num_classes):
    """(C_i [K, d], |D_{i,j}| [K]) from the rows >= 0 of `rows` (Eq. 5), inference mode."""
    r = jnp.maximum(rows, 0)
    sums, counts = class_sums(model.features(params, x[r]), y[r], (rows >= 0).astype(jnp.float32),
                              num_classes)
    return sums / jnp.maximum(counts, 1.0)[:, None], counts


def last_epoch_weights(num_steps, n, *, batch_size: int, total_steps: int, epochs):
    """[C, S, B] float: 1 at the stream positions p = s B + b of each client's last n trained
    examples, p in [end - n, end) with end = min(num_steps B, E n) (epochs mode; E n excludes the
    last batch's top-up) or num_steps B (steps mode); 0 elsewhere (module docstring)."""
    pos = jnp.arange(total_steps * batch_size).reshape(total_steps, batch_size)
    end = num_steps * batch_size
    if epochs is not None:
        end = jnp.minimum(end, epochs * n)
    end, start = end[:, None, None], (end - n)[:, None, None]
    return ((pos[None] >= start) & (pos[None] < end)).astype(jnp.float32)


def aggregate(protos, counts, active, *, aggregation: str):
    """Global prototypes over the holders (module docstring): protos [C, K, d], counts [C, K],
    active [C] (clients whose message counts). Returns (C-bar [K, d], has [K])."""
    holds = (counts > 0) & active[:, None]
    w = holds.astype(protos.dtype) if aggregation == "mean" else counts * holds
    total = w.sum(0)
    mean = jnp.einsum("ck,ckd->kd", w, protos) / jnp.where(total > 0, total, 1.0)[:, None]
    return mean, total > 0


@defaults(FEDPROTO, uses=frozenset({"cohort", "work", "client_opt"}))
def fedproto(model: Union[Model, Sequence[Model]], *, lam: float = 1.0,
             group_of: Union[str, Sequence[int]] = "blocks", aggregation: str = "mean",
             proto_loss: str = "sample", prototypes: str = "after_training",
             setup: Setup = Setup()) -> HeteroAlgorithm:
    """FedProto (module docstring). model: one Model, or one per architecture group with
    `group_of` (a [num_clients] array of group ids, or "blocks": contiguous blocks in client
    order); lam: weight of the prototype distance (0: local training; may be traced);
    aggregation: "mean" (unweighted over holders, the code) or "weighted" (by counts, Eq. 6);
    proto_loss: "sample" (per example, the code) or "prototype" (Eq. 8);
    prototypes: "after_training" (default: one inference pass of the trained model) or
    "last_epoch" (during the last local epoch, pre-step features in training mode: Algorithm 1
    and the code; module docstring)."""
    validate.non_negative("lam", lam)
    validate.one_of("aggregation", aggregation, set(AGGREGATIONS))
    validate.one_of("proto_loss", proto_loss, set(PROTO_LOSSES))
    validate.one_of("prototypes", prototypes, set(PROTOTYPES))
    arch = hetero.architectures(model, group_of)
    hetero.require_split(arch, "fedproto")
    cohort_fields = {f.name for f in dataclasses.fields(Cohort)}
    all_clients = setup.cohort is None and not any(k in cohort_fields for k, _ in setup.overrides)
    s = resolve(setup, fedproto)
    tx = s.client_opt.build("client_optimizer")
    distinct = all_clients or s.cohort.sampling != "size"

    def check(data):
        arch.check(data)
        if not all_clients:
            s.cohort.check(data)
        s.work.check(data)
        if data.num_classes < 1:
            raise ValueError("data: num_classes must be set (the prototypes are per class)")
        dims = hetero.feature_dims(arch, data.x[:1])
        if any(len(d) != 1 for d in dims) or len(set(dims)) != 1:
            raise ValueError(f"model: the prototype dimension must be one vector size across "
                             f"architecture groups, got features of shapes {list(dims)} for "
                             f"groups 0..{arch.num_groups - 1}")

    def init(key, data):
        check(data)
        d = hetero.feature_dims(arch, data.x[:1])[0][0]
        server = ProtoServer(protos=jnp.zeros((data.num_classes, d), jnp.float32),
                             has=jnp.zeros(data.num_classes, bool), round=jnp.zeros((), jnp.int32))
        return ClientRows(server=server, rows=hetero.init_rows(arch, key, data))

    def round_(state, data, key):
        N, K = data.num_clients, data.num_classes
        server = state.server
        part, data, (k_train,) = begin_round(
            key, data, s, cohort=Cohort(N) if all_clients else None,
            ids=jnp.arange(N, dtype=jnp.int32) if all_clients else None)
        width = max(data.max_client_size, 1)
        lo, n = data.offsets[part.ids], data.client_sizes[part.ids]
        if prototypes == "after_training":     # [C, width] the client's rows (-1: none)
            proto_of = jnp.where(jnp.arange(width)[None, :] < n[:, None],
                                 lo[:, None] + jnp.arange(width)[None, :], -1)
        else:                                  # [C, S, B] weights of the last epoch's positions
            proto_of = last_epoch_weights(part.batches.num_steps, n, batch_size=s.work.batch_size,
                                          total_steps=part.batches.idx.shape[1],
                                          epochs=s.work.epochs)
        d = server.protos.shape[1]

        def client(g, params, args):
            idx, mask, k, proto_of = args
            m = arch.models[g]

            def loss_fn(p, xb, yb, rng):
                z = m.features(p, xb, train=True, rng=rng)
                ce = jnp.mean(m.loss(m.head(p, z), yb))
                return ce + lam * prototype_penalty(z, yb, server.protos, server.has,
                                                    form=proto_loss)

            if prototypes == "after_training":
                res = local_train(m, tx, loss_fn=loss_fn)(params, data.x, data.y, idx, mask, k)
                protos, counts = client_prototypes(m, res.params, data.x, data.y, proto_of, K)
                return res.params, (protos, counts, res.loss)

            def step_sums(p, xb, yb, rng, w):       # pre-step features, the loss's forward pass
                return class_sums(m.features(p, xb, train=True, rng=rng), yb, w, K)

            res = local_train(m, tx, loss_fn=loss_fn, step_stats=step_sums)(
                params, data.x, data.y, idx, mask, k, step_inputs=proto_of)
            sums, counts = res.stats
            return res.params, (sums / jnp.maximum(counts, 1.0)[:, None], counts, res.loss)

        out_shape = (jax.ShapeDtypeStruct((K, d), jnp.float32), jax.ShapeDtypeStruct((K,), jnp.float32),
                     jax.ShapeDtypeStruct((), jnp.float32))
        per_client = (part.batches.idx, part.batches.step_mask, client_keys(k_train, part.ids),
                      proto_of)
        rows, (protos, counts, loss) = hetero.map_groups(
            arch, client, state.rows, part.ids, per_client, num_clients=N, distinct=distinct,
            out_shape=out_shape)
        active = part.batches.num_steps > 0
        new_protos, has = aggregate(protos, counts, active, aggregation=aggregation)
        held = ((counts > 0) & active[:, None]).sum(1).astype(jnp.float32)
        up = held * (4 * d + 8)
        down = has.sum().astype(jnp.float32) * (4 * d + 4)
        C = part.ids.shape[0]
        w = active.astype(jnp.float32)
        metrics = dict(local_loss=jnp.sum(loss * w) / jnp.maximum(w.sum(), 1.0),
                       clients_aggregated=w.sum(), classes_with_prototype=has.sum().astype(jnp.float32),
                       bytes_up=up.sum(), bytes_up_per_client=up.sum() / jnp.maximum(w.sum(), 1.0),
                       bytes_down=down * C, bytes_down_per_client=down)
        server = ProtoServer(protos=new_protos, has=has, round=server.round + 1)
        return ClientRows(server=server, rows=rows), metrics

    def evaluate_sums(state, data):
        N = data.num_clients
        classes = data.label_counts() > 0                               # [N, K] classes held
        P, has = state.server.protos, state.server.has

        def head(g, row, x, y, _):
            logits = arch.models[g].apply(row, x)
            return arch.models[g].loss(logits, y), jnp.argmax(logits, -1) == y

        def nearest(g, row, x, y, own):
            dist = sq_dist(arch.models[g].features(row, x)[:, None, :], P[None])   # [W, K]
            allowed = own & has
            pred = jnp.argmin(jnp.where(allowed[None, :], dist, jnp.inf), axis=-1)
            return jnp.where(has[y], dist[jnp.arange(y.shape[0]), y], 0.0), pred == y

        out = {}
        for split_name, split in (("train", data), ("test", data.test)):
            if split is None or not split.num_examples:
                continue
            out[f"{split_name}_personal"] = hetero.group_sums(arch, state.rows, split, head,
                                                              num_clients=N)
            out[f"{split_name}_proto"] = hetero.group_sums(arch, state.rows, split, nearest,
                                                           num_clients=N, extra=classes)
        return out

    def client_params(state, ids):
        if arch.num_groups != 1:
            raise ValueError("client_params: clients of different architectures cannot be "
                             "stacked; read state.rows[g] (group g's params) instead")
        return jax.tree.map(lambda r: r[ids], state.rows[0])

    config = dict(group_of=group_of if isinstance(group_of, str) else list(arch.group_of),
                  derived=dict(all_clients=all_clients, models=[m.name for m in arch.models]))
    return HeteroAlgorithm(init=init, round=round_, client_params=client_params,
                           model=arch.models[0], global_params=None, personalized=False,
                           check=check, config=config, setup=s, architectures=arch,
                           evaluate_sums=evaluate_sums)


_evaluate = jax.jit(lambda alg, state, data: alg.evaluate_sums(state, data), static_argnums=0)


def evaluate(alg: HeteroAlgorithm, state, data) -> dict:
    """Host-side metrics of `evaluate_sums`: for each of train/test x personal (own head) / proto
    (nearest global prototype), the core.evaluate summary plus `{name}_accuracy_client_std`
    (per-client accuracy, std over clients; `_client_mean` is its mean)."""
    sums = jax.device_get(_evaluate(alg, state, data))
    out = {}
    for name, (l, c, n) in sums.items():
        out.update(summarize(name, l, c, n))
        acc = hetero.client_accuracy(c, n)
        out[f"{name}_accuracy_client_std"] = acc["std"]
    return out
