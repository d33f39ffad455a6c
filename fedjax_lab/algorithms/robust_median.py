"""signSGD / medianSGD and their noisy versions: Chen, Chen, Sun, Wu, Hong, "Distributed Training
with Heterogeneous Data: Bridging Median- and Mean-Based Algorithms", NeurIPS 2020 (arXiv:1906.01736).

Problem: min_x f(x) = 1/M sum_i f_i(x), node i holds f_i. Round t, node i computes a stochastic
gradient g_{t,i} of f_i at x_t and sends a perturbed copy (xi_{t,i} iid, zero mean, symmetric):

    medianSGD (Yin et al. 2018)        x_{t+1} = x_t - delta_t * median_i(g_{t,i})
    noisy medianSGD                    x_{t+1} = x_t - delta_t * median_i(g_{t,i} + sigma xi_{t,i})
    signSGD, majority vote (Bernstein) x_{t+1} = x_t - delta_t * sign(sum_i sign(g_{t,i}))
    noisy signSGD                      x_{t+1} = x_t - delta_t * sign(sum_i sign(g_{t,i} + sigma xi_{t,i}))

(median coordinate-wise; sigma is the paper's noise scale b.)

Why (the paper's point): sign and median track the *median* of the local gradients, so under
heterogeneous data they stop where median_i grad f_i(x) = 0, which is not a stationary point of f
(gap: || E median_i g_i - mean_i grad f_i ||). Noise closes the gap: for xi with density p
symmetric about 0,
    E sign(g + sigma xi) = 2 P(xi > -g/sigma) - 1 ~= 2 p(0) g / sigma    (|g| << sigma),
which is *linear* in g, so the vote (and likewise the median of the perturbed values, whose
population median m solves sum_i F((m - g_i)/sigma) = M/2, F linearized at 0) follows the mean of
the g_i. With uniform xi on [-1, 1] the linearization is exact for |g| <= sigma:
E sign(g + sigma xi) = g / sigma. The gap shrinks like 1/sigma while the variance of the sent
messages grows with sigma, so the step delta must shrink (the paper's theorems couple sigma, delta
and the horizon T; we expose sigma and delta as hyperparameters and a 1/sqrt(t+1) decay).

Options (what the paper leaves open, or where variants are in common use):
  * noise: "gaussian" xi ~ N(0, 1) or "uniform" xi ~ U[-1, 1]; sigma = 0 gives plain signSGD/medianSGD.
  * vote (signSGD): "majority" (the paper: sign of the sum of signs, 1 bit down) or "mean"
    (the mean of the signs, an unbiased scaled mean estimate with uniform noise, log2(M+1) bits down).
  * lr_decay: "constant" delta (the theorems fix delta for a horizon T) or "inv_sqrt"
    delta_t = delta / sqrt(t + 1).
  * local_steps: the paper sends one stochastic gradient per round (local_steps=1, a mini-batch of
    batch_size examples at x_t). local_steps > 1 is our extension to federated rounds: node i runs
    local SGD (client_lr) and sends its accumulated gradient (x_t - x_i)/client_lr, which equals
    g_{t,i} for one step; the noise and the sign/median are applied to that message.
We could not consult the authors' code offline, so no code-specific variant is reproduced here.

Attacks (fedjax_lab.attacks) act on the sent messages before the sign, i.e. a Byzantine node sends
what it likes; the honest nodes' noise is unaffected. Clients with no data (weight 0) are absent.
Communication: signSGD sends ceil(P/8) bytes up; the majority vote comes back in ceil(P/8) bytes
(the mean vote in P log2(M+1) bits) when every client takes part each round, else nodes must fetch
the dense model; medianSGD sends dense float32 both ways.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import attacks as attacks_lib
from fedjax_lab.aggregators.coordinate import median, sign_vote
from fedjax_lab.core import comm, validate
from fedjax_lab.core.evaluate import client_params_of_global
from fedjax_lab.core.local import local_train
from fedjax_lab.core.rounds import (LocalWork, client_weights, init_server, participate,
                                    server_update, weighted_mean_scalar)
from fedjax_lab.core.tree import tree_scale, tree_sub, tree_weighted_mean
from fedjax_lab.core.types import Algorithm, Model, batch_loss

NOISE_STREAM = 0x401   # fold_in constant: the noise's random stream, apart from the attack's


def perturb(g, key, *, noise: str, sigma: float):
    """g + sigma * xi, xi ~ N(0, 1) ("gaussian") or U[-1, 1] ("uniform"), iid per coordinate.

    The stream (a contract, tested): one key per leaf, jax.random.split(key, num_leaves) in
    jax.tree.flatten order, xi = jax.random.normal / uniform(k, leaf.shape, leaf.dtype[, -1, 1]).
    A round passes client i the key fold_in(fold_in(round_key, NOISE_STREAM), i), so i's noise
    depends on the round and on i only (not on its row, nor on who else was sampled).
    """
    if sigma == 0:
        return g
    leaves, treedef = jax.tree.flatten(g)
    keys = jax.random.split(key, len(leaves))
    draw = (lambda k, x: jax.random.normal(k, x.shape, x.dtype)) if noise == "gaussian" else \
        (lambda k, x: jax.random.uniform(k, x.shape, x.dtype, -1.0, 1.0))
    return jax.tree.unflatten(treedef, [x + sigma * draw(k, x) for k, x in zip(keys, leaves)])


def server_schedule(server_lr: float, lr_decay: str):
    """delta_t: constant, or delta / sqrt(t + 1) with t the server step count."""
    if lr_decay == "constant":
        return server_lr
    return lambda t: server_lr / jnp.sqrt(t + 1.0)


def _family(model: Model, *, rule: str, noise: str, sigma: float, vote: str, server_lr: float,
            lr_decay: str, client_lr: float, local_steps: int, batch_size: int,
            clients_per_round: int, sampling: str, shuffle: str, attack: str,
            attack_fraction: float, attack_scale: Optional[float], attack_seed: int,
            name: str) -> Algorithm:
    validate.one_of("noise", noise, {"gaussian", "uniform"})
    validate.non_negative("sigma", sigma)
    validate.one_of("vote", vote, {"majority", "mean"})
    validate.positive("server_lr", server_lr)
    validate.one_of("lr_decay", lr_decay, {"constant", "inv_sqrt"})
    validate.positive("client_lr", client_lr)
    adversary = attacks_lib.Adversary(attack, attack_fraction, attack_scale, attack_seed)
    work = LocalWork(clients_per_round=clients_per_round, batch_size=batch_size,
                     local_steps=local_steps, sampling=sampling, weighting="uniform", shuffle=shuffle)
    server_tx = optax.sgd(server_schedule(server_lr, lr_decay))
    client_tx = optax.sgd(client_lr)
    config = dict(algorithm=name, model=model.name, rule=rule, noise=noise, sigma=sigma,
                  server_lr=server_lr, lr_decay=lr_decay, client_lr=client_lr,
                  local_steps=local_steps, batch_size=batch_size,
                  clients_per_round=clients_per_round, sampling=sampling, shuffle=shuffle,
                  attack=attack, attack_fraction=attack_fraction)
    config.update({"vote": vote} if rule == "sign" else {})
    config.update(adversary.config())
    grad_fn = jax.value_and_grad(lambda w, xb, yb, rng: batch_loss(model, w, xb, yb, rng))

    def message(w_t, x, y, idx, step_mask, key):
        """(g_i, loss): one stochastic gradient at x_t, or the accumulated local-SGD gradient."""
        if local_steps == 1:
            loss, g = grad_fn(w_t, x[idx[0]], y[idx[0]], jax.random.fold_in(key, 0))
            return tree_scale(g, step_mask[0].astype(jnp.float32)), loss * step_mask[0]
        res = local_train(model, client_tx)(w_t, x, y, idx, step_mask, key)
        return tree_scale(tree_sub(w_t, res.params), 1.0 / client_lr), res.loss

    def init(key, data):
        work.check(data)
        return init_server(server_tx, model.init(key, data.x[:1]))

    def round(state, data, key):
        k_part, k_train = jax.random.split(key)
        part = participate(k_part, data, work)
        w_t = state.params
        per_client = lambda i: jax.random.fold_in(k_train, i)
        keys = jax.vmap(per_client)(part.ids)
        data = adversary.poison(data)
        g, loss = jax.vmap(message, in_axes=(None, None, None, 0, 0, 0))(
            w_t, data.x, data.y, part.batches.idx, part.batches.step_mask, keys)
        k_noise = jax.random.fold_in(key, NOISE_STREAM)
        noisy = jax.vmap(lambda gi, i: perturb(gi, jax.random.fold_in(k_noise, i), noise=noise,
                                               sigma=sigma))(g, part.ids)
        p = client_weights(part, work, drop_stragglers=False)
        noisy = adversary.corrupt(noisy, part.ids, data.num_clients, key, weights=p)
        if rule == "median":
            direction = median(noisy, p)
        elif vote == "majority":
            direction = sign_vote(noisy, p)
        else:
            direction = tree_weighted_mean(jax.tree.map(jnp.sign, noisy), (p > 0).astype(jnp.float32))
        state = server_update(server_tx, state, tree_scale(direction, -1.0))
        num_up = jnp.sum(p > 0)
        dense = comm.dense_bytes(w_t)
        full = data.num_clients == clients_per_round
        if rule == "median":
            up, down = dense, dense
        else:
            up = comm.sign_bytes(w_t)
            down = (comm.sign_bytes(w_t) if vote == "majority"
                    else comm.level_bytes(w_t, clients_per_round + 1)) if full else dense
        metrics = dict(local_loss=weighted_mean_scalar(loss, p),
                       clients_aggregated=num_up.astype(jnp.float32),
                       **comm.round_metrics(up_per_client=up, down_per_client=down, num_up=num_up,
                                            num_down=clients_per_round))
        return state, metrics

    return Algorithm(name=name, init=init, round=round, model=model,
                     client_params=client_params_of_global(lambda s: s.params),
                     global_params=lambda s: s.params, check=work.check, config=config)


def signsgd(model: Model, *, noise: str = "gaussian", sigma: float = 0.0, vote: str = "majority",
            server_lr: float = 1e-3, lr_decay: str = "constant", client_lr: float = 0.01,
            local_steps: int = 1, batch_size: int = 10, clients_per_round: int = 10,
            sampling: str = "uniform", shuffle: str = "auto", attack: str = "none",
            attack_fraction: float = 0.0, attack_scale: Optional[float] = None,
            attack_seed: int = 0, name: str = "signsgd") -> Algorithm:
    """(Noisy) signSGD with majority vote; sigma > 0 is noisy signSGD (see module docstring)."""
    return _family(model, rule="sign", noise=noise, sigma=sigma, vote=vote, server_lr=server_lr,
                   lr_decay=lr_decay, client_lr=client_lr, local_steps=local_steps,
                   batch_size=batch_size, clients_per_round=clients_per_round, sampling=sampling,
                   shuffle=shuffle, attack=attack, attack_fraction=attack_fraction,
                   attack_scale=attack_scale, attack_seed=attack_seed, name=name)


def mediansgd(model: Model, *, noise: str = "gaussian", sigma: float = 0.0, server_lr: float = 0.1,
              lr_decay: str = "constant", client_lr: float = 0.01, local_steps: int = 1,
              batch_size: int = 10, clients_per_round: int = 10, sampling: str = "uniform",
              shuffle: str = "auto", attack: str = "none", attack_fraction: float = 0.0,
              attack_scale: Optional[float] = None, attack_seed: int = 0,
              name: str = "mediansgd") -> Algorithm:
    """(Noisy) medianSGD: coordinate-wise median of the (perturbed) client gradients."""
    return _family(model, rule="median", noise=noise, sigma=sigma, vote="majority",
                   server_lr=server_lr, lr_decay=lr_decay, client_lr=client_lr,
                   local_steps=local_steps, batch_size=batch_size,
                   clients_per_round=clients_per_round, sampling=sampling, shuffle=shuffle,
                   attack=attack, attack_fraction=attack_fraction, attack_scale=attack_scale,
                   attack_seed=attack_seed, name=name)


# Noisy defaults for the CLI: sigma should be of the order of the spread of the clients'
# gradient coordinates (0.1 suits logistic models on standardized data; see experiments/reproduce).
noisy_signsgd = functools.partial(signsgd, sigma=0.1, name="noisy_signsgd")
noisy_mediansgd = functools.partial(mediansgd, sigma=0.1, name="noisy_mediansgd")
