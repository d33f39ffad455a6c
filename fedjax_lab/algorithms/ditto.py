"""Ditto (Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021, Algorithm 1).

Two problems share one round. The global model solves the usual federated objective with any
base solver (FedAvg by default; FedProx with `mu > 0`; FedOpt with another `server_optimizer`):

    w* = argmin_w G(F_1(w), ..., F_N(w))

and every client k keeps a personal model v_k, a row of the state [N, ...], solving

    min_{v_k}  h_k(v_k; w*) = F_k(v_k) + lam/2 * ||v_k - w*||^2 .

Round t, sampled clients S_t, for k in S_t (vmapped):
    v_k <- v_k - eta_p * (grad F_k(v_k) + lam * (v_k - w_t))        s = personal_steps times
    w_k <- UPDATE_GLOBAL(w_t, grad F_k)                              local_steps times
and the server aggregates the w_k into w_{t+1}. Unsampled clients keep their v_k. `client_params`
returns v_k; `global_params` returns w_t. lam -> 0 gives local training, lam -> inf the global model.

Stragglers (`stragglers`, FedProx Sec. 5.2) do less work on both problems: by default the personal
steps reuse the global steps' batches and mask, so a straggler's personal work is cut exactly as
its global work; with `personal_steps=s` a straggler that does q of its local_steps global steps
does ceil(s * q / local_steps) personal steps (the same fraction, at least one). With
`drop_stragglers=True` (default) their global updates are left out of the average; their personal
models keep the partial work either way.

Choosing lam: the paper selects it per client on local validation data from {0.05, 0.1, 0.2}
under strong attacks and {0.1, 1, 2} otherwise (Sec. 5 / App. C); `experiments/reproduce/ditto.py`
picks it on held-out validation clients' data from such a grid.

Paper vs. official code (github.com/litian96/ditto, flearn/trainers_MTL/ditto.py): the code
interleaves one personal step and one global step on *the same mini-batch*, for local_iters
steps; the paper leaves the batches open. We take the code's reading by default (the personal
steps reuse the global steps' batches, `personal_steps=None`); `personal_steps=s` draws s
independent personal batches instead. Personal models start at w_0 (the code does the same).
The personal optimizer's state (e.g. momentum) restarts every round, as the code's plain SGD has
none. The code's `dynamic_lam` (a per-step choice of lam on validation loss) is not implemented.
Sampling and weighting: the code's default (`--sampling 2`, fedbase.select_clients) draws the C
clients with probability n_k / n without replacement (numpy `choice(replace=False, p=...)`) and
averages their updates uniformly (`simple_average`); our defaults are uniform sampling and n_k
weighting, as in FedAvg. `sampling="size_distinct", weighting="uniform"` is the code's scheme
(`sampling="size"` draws by size with replacement, as FedProx's Algorithm 2 does).

Attacks (as in FedAvg, `fedjax_lab.attacks`): a fixed set of round(attack_fraction * N) malicious
clients either corrupt their global update w_k - w_t (sign_flip: -attack_scale * (w_k - w_t);
random_update: the paper's A2 "random updates"; scaled: its "model replacement"; gaussian, alie)
or train on flipped labels (label_flip, y -> num_classes - 1 - y, which then also feeds their own
personal models). Benign clients' v_k only see w_t through lam. The code's variants differ in
detail: its boosting factor is clients_per_round (ours attack_scale, default 10), and its label
poisoning draws uniformly random labels on FEMNIST/Fashion-MNIST (1 - y on CelebA, -y on Vehicle)
rather than flipping them.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_lab import attacks as attacks_lib
from fedjax_lab.algorithms.fedavg import _name
from fedjax_lab.core import comm, validate
from fedjax_lab.core.batching import draw_batches
from fedjax_lab.core.client_state import RowAlgorithm, RowRound, row_algorithm
from fedjax_lab.core.local import local_train
from fedjax_lab.core.optimizers import make_optimizer
from fedjax_lab.core.rounds import (LocalWork, client_weights, init_server, participate,
                                    sample_ids, server_update, weighted_mean_scalar)
from fedjax_lab.core.tree import tree_sq_norm, tree_sub, tree_weighted_mean
from fedjax_lab.core.types import Model




def ditto(model: Model, *, lam: float = 0.1, personal_lr: Optional[float] = None,
          personal_steps: Optional[int] = None, mu: float = 0.0, client_lr: float = 0.01,
          client_optimizer="sgd", client_momentum: float = 0.0, server_optimizer="sgd",
          server_lr: float = 1.0, clients_per_round: int = 10, local_steps: int = 20,
          epochs: Optional[int] = None, batch_size: int = 10, stragglers: float = 0.0,
          drop_stragglers: bool = True, sampling: str = "uniform", weighting: str = "examples",
          shuffle: str = "auto", attack: str = "none", attack_fraction: float = 0.0,
          attack_scale: Optional[float] = None, attack_seed: int = 0) -> RowAlgorithm:
    """Ditto with a FedAvg (mu = 0) or FedProx (mu > 0) global solver; see the module docstring.

    lam: personalization strength; personal_lr: step size of the personal SGD (default client_lr);
    personal_steps: s personal steps on their own batches (default: the global steps' batches);
    a straggler does the fraction of them that it does of its global steps (module docstring).
    """
    validate.non_negative("lam", lam)
    validate.non_negative("mu", mu)
    adversary = attacks_lib.Adversary(attack, attack_fraction, attack_scale, attack_seed)
    personal_lr = client_lr if personal_lr is None else personal_lr
    validate.positive("personal_lr", personal_lr)
    if personal_steps is not None:
        validate.positive("personal_steps", personal_steps, integer=True)
        if epochs is not None:
            raise ValueError("personal_steps must be None (reuse the global batches) when "
                             f"epochs is set, got personal_steps={personal_steps}")
    work = LocalWork(clients_per_round=clients_per_round, batch_size=batch_size,
                     local_steps=local_steps, epochs=epochs, stragglers=stragglers,
                     sampling=sampling, weighting=weighting, shuffle=shuffle)
    client_tx = make_optimizer(client_optimizer, client_lr, momentum=client_momentum,
                               arg="client_optimizer")
    personal_tx = make_optimizer(client_optimizer, personal_lr, momentum=client_momentum,
                                 arg="client_optimizer")
    server_tx = make_optimizer(server_optimizer, server_lr, arg="server_optimizer")
    config = dict(algorithm="ditto", model=model.name, lam=lam, personal_lr=personal_lr,
                  personal_steps=personal_steps, mu=mu, client_lr=client_lr,
                  client_optimizer=_name(client_optimizer), client_momentum=client_momentum,
                  server_optimizer=_name(server_optimizer), server_lr=server_lr,
                  clients_per_round=clients_per_round, local_steps=local_steps, epochs=epochs,
                  batch_size=batch_size, stragglers=stragglers, drop_stragglers=drop_stragglers,
                  sampling=sampling, weighting=weighting, shuffle=shuffle,
                  attack=attack, attack_fraction=attack_fraction, attack_scale=attack_scale,
                  attack_seed=attack_seed)

    def init_server_(key, data):
        work.check(data)
        return init_server(server_tx, model.init(key, data.x[:1]))

    def sample(data, key):
        return sample_ids(jax.random.split(key, 3)[0], data, work)

    def step(server, v, ids, data, key):
        k_part, k_train, k_pers = jax.random.split(key, 3)
        part = participate(k_part, data, work, ids=ids)
        num = ids.shape[0]
        if part.ids.shape[0] != num:     # a client mesh pads the round with step-less dummies
            v = jax.tree.map(lambda x: jnp.concatenate(
                [x, jnp.repeat(x[:1], part.ids.shape[0] - num, axis=0)]), v)
        w_t = server.params
        fold = lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(part.ids)
        data = adversary.poison(data)

        # Personal models: s steps on F_k(v) + lam/2 ||v - w_t||^2 from the client's own v_k.
        if personal_steps is None:
            p_idx, p_mask = part.batches.idx, part.batches.step_mask
        else:
            pb = draw_batches(k_pers, data, part.ids, batch_size=batch_size,
                              local_steps=personal_steps, shuffle=shuffle)
            # stragglers do the fraction of their personal work that they do of their global work
            q = part.batches.num_steps
            p_steps = (personal_steps * q + local_steps - 1) // local_steps
            p_idx = pb.idx
            p_mask = pb.step_mask & (jnp.arange(personal_steps)[None, :] < p_steps[:, None])
        personal = local_train(model, personal_tx,
                               extra_loss=lambda p: 0.5 * lam * tree_sq_norm(tree_sub(p, w_t)))
        pres = jax.vmap(personal, in_axes=(0, None, None, 0, 0, 0))(
            v, data.x, data.y, p_idx, p_mask, fold(k_pers))

        # Global model: the base solver (FedAvg / FedProx) from w_t.
        prox = None if mu == 0 else (lambda p: 0.5 * mu * tree_sq_norm(tree_sub(p, w_t)))
        train = local_train(model, client_tx, extra_loss=prox)
        res = jax.vmap(train, in_axes=(None, None, None, 0, 0, 0))(
            w_t, data.x, data.y, part.batches.idx, part.batches.step_mask, fold(k_train))
        deltas = jax.vmap(tree_sub, in_axes=(0, None))(res.params, w_t)
        p = client_weights(part, work, drop_stragglers=drop_stragglers)
        deltas = adversary.corrupt(deltas, part.ids, data.num_clients, key, weights=p)
        server = server_update(server_tx, server, tree_weighted_mean(deltas, p))

        num_up = jnp.sum(p > 0)
        real = part.valid.astype(jnp.float32)
        metrics = dict(local_loss=weighted_mean_scalar(res.loss, p),
                       local_objective=weighted_mean_scalar(res.objective, p),
                       personal_loss=weighted_mean_scalar(pres.loss, real),
                       personal_objective=weighted_mean_scalar(pres.objective, real),
                       clients_aggregated=num_up.astype(jnp.float32),
                       **comm.round_metrics(up_per_client=comm.dense_bytes(w_t),
                                            down_per_client=comm.dense_bytes(w_t), num_up=num_up,
                                            num_down=work.clients_per_round))
        return server, jax.tree.map(lambda x: x[:num], pres.params), metrics

    spec = RowRound(init_server=init_server_, init_row=lambda server: server.params,
                    sample=sample, step=step, params=lambda server, rows: rows)
    return row_algorithm(spec, name="ditto", model=model, global_params=lambda s: s.params,
                         check=work.check, config=config)

