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
and the horizon T; sigma and delta are hyperparameters, and the server optimizer's
`lr_schedule="inv_sqrt"` is the decay delta_t = delta / sqrt(t + 1)).

The round skeleton (core/skeleton.py) with: the client's gradient as the message, the uplink
`noise(noise, sigma)` (+ `sign()` for signSGD, uplink.py), the aggregator `sign()` (majority
vote), `mean()` (mean vote) or `median()`, and server SGD descending on the aggregate (delta =
server_lr: 1e-3 for signSGD, 0.1 for medianSGD). Any other aggregator, attack or server optimizer
of the `Setup` composes (signSGD with `aggregator="trimmed_mean"` is a trimmed mean of the signs).

Options (what the paper leaves open, or where variants are in common use):
  * noise: "gaussian" xi ~ N(0, 1) or "uniform" xi ~ U[-1, 1]; sigma = 0 gives plain signSGD/medianSGD.
  * vote (signSGD): "majority" (the paper: sign of the sum of signs, 1 bit down) or "mean"
    (the mean of the signs, an unbiased scaled mean estimate with uniform noise, log2(M+1) bits
    down); it picks the default aggregator, a `Setup.aggregator` replaces it.
  * local work: the paper sends one stochastic gradient per round (local_steps=1, a mini-batch of
    batch_size examples at x_t). More local steps is our extension to federated rounds: node i
    runs local training with the client optimizer and sends (x_t - x_i) / client_lr, which for SGD
    is the sum of its local gradients and equals g_{t,i} for one step; the noise and the
    sign/median apply to that message.
We could not consult the authors' code offline, so no code-specific variant is reproduced here.

Attacks (fedjax_lab.attacks) act on what is sent, after the uplink's encoding: the signs for
signSGD, the perturbed gradients for medianSGD (the honest nodes' noise is unaffected). A Byzantine
node sends any message of the protocol's format, so the server reads an attacker's signSGD message
by its signs (a "scaled" attacker gains nothing, "gaussian" sends random signs). Changed from the
earlier gradient-domain attacks: sign_flip is the same (sign(-g) = -sign(g)); ALIE's mean and
standard deviation are computed over the honest *signs*. Clients with no data (weight 0) are absent.

Communication: signSGD sends ceil(P/8) bytes up; the majority vote comes back in ceil(P/8) bytes
(a uniform mean vote in P log2(M+1) bits) when every client takes part each round, else nodes must
fetch the dense model; medianSGD sends dense float32 both ways.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_lab import aggregators
from fedjax_lab import uplink
from fedjax_lab.extend import (Algorithm, Cohort, LocalWork, Model, Optimizer, ServerRound, Setup,
                               batch_loss, comm, defaults, local_train, resolve, tree_scale,
                               tree_sub, validate)

USES = frozenset({"cohort", "work", "client_opt", "server_opt", "aggregator", "attack"})
_SHARED = dict(cohort=Cohort(clients_per_round=10, sampling="uniform", weighting="uniform"),
               work=LocalWork(batch_size=10, local_steps=1), client_opt=Optimizer("sgd", lr=0.01))
SIGNSGD = Setup(server_opt=Optimizer("sgd", lr=1e-3), aggregator=aggregators.sign(), **_SHARED)
MEDIANSGD = Setup(server_opt=Optimizer("sgd", lr=0.1), aggregator=aggregators.median(), **_SHARED)
VOTES = {"majority": aggregators.sign, "mean": aggregators.mean}


def gradient_client(model: Model, client_opt: Optimizer):
    """g_{t,i}: one stochastic gradient at w_t when one step is planned, else (w_t - w_i) / lr
    after local training. Returns client(w_t, x, y, idx, step_mask, key) -> (g, loss, objective)."""
    grad_fn = jax.value_and_grad(lambda w, xb, yb, rng: batch_loss(model, w, xb, yb, rng))
    train = local_train(model, client_opt.build("client_optimizer"))

    def client(w_t, x, y, idx, step_mask, key):
        if idx.shape[0] == 1:          # static: the paper's round, no optimizer involved
            loss, g = grad_fn(w_t, x[idx[0]], y[idx[0]], jax.random.fold_in(key, 0))
            loss = loss * step_mask[0]
            return tree_scale(g, step_mask[0].astype(jnp.float32)), loss, loss
        res = train(w_t, x, y, idx, step_mask, key)
        return tree_scale(tree_sub(w_t, res.params), 1.0 / client_opt.lr), res.loss, res.objective
    return client


def _reads_signs(agg: aggregators.Aggregator) -> aggregators.Aggregator:
    """`agg` over sign(s_k): a 1-bit message carries its signs only, whatever an attacker put in."""
    return aggregators.Aggregator(agg.name, lambda u, w: agg(jax.tree.map(jnp.sign, u), w),
                                  agg.check, agg.options)


def _vote_bytes(s: Setup):
    """Bytes down per client: the vote (ceil(P/8) bytes; a uniform mean of C signs, C + 1 levels)
    when every client takes part, so that all nodes can apply it; otherwise the dense model."""
    C, name = s.cohort.clients_per_round, s.aggregator.name

    def down(w_t, data):
        if data.num_clients != C or s.cohort.sampling == "size":     # someone misses the round
            return comm.dense_bytes(w_t)
        if name == "sign":
            return comm.sign_bytes(w_t)
        if name == "mean" and s.cohort.weighting == "uniform":
            return comm.level_bytes(w_t, C + 1)
        return comm.dense_bytes(w_t)
    return down


def _family(model, factory, setup, *, noise, sigma, vote=None) -> Algorithm:
    """The skeleton with gradient messages, perturbed (and signed, given a `vote`) on the uplink;
    the vote picks the default aggregator over factory.defaults; stragglers kept by default."""
    send = uplink.noise(noise, sigma)
    if vote is not None:
        validate.one_of("vote", vote, VOTES)
        send = uplink.chain(send, uplink.sign())
        setup = setup if setup.aggregator is not None else \
            dataclasses.replace(setup, aggregator=VOTES[vote]())
    s = resolve(setup, factory, drop_stragglers=False)
    down = None if vote is None else _vote_bytes(s)
    s = dataclasses.replace(s, uplink=send, aggregator=s.aggregator if vote is None
                            else _reads_signs(s.aggregator))
    return ServerRound(model, s, client=gradient_client(model, s.client_opt),
                       gradient_message=True,
                       down_bytes=down).algorithm(factory.__name__, {})


@defaults(SIGNSGD, uses=USES)
def signsgd(model: Model, *, noise: str = "gaussian", sigma: float = 0.0, vote: str = "majority",
            setup: Setup = Setup()) -> Algorithm:
    """(Noisy) signSGD: x_{t+1} = x_t - delta sign(sum_i sign(g_i + sigma xi_i)) with the majority
    vote, delta/M sum_i sign(g_i + sigma xi_i) with vote="mean". sigma may be traced."""
    return _family(model, signsgd, setup, noise=noise, sigma=sigma, vote=vote)


@defaults(SIGNSGD, uses=USES)
def noisy_signsgd(model: Model, *, noise: str = "gaussian", sigma: float = 0.1,
                  vote: str = "majority", setup: Setup = Setup()) -> Algorithm:
    """signsgd with sigma = 0.1 by default (of the order of the spread of the clients' gradient
    coordinates for logistic models on standardized data; see experiments/reproduce)."""
    return _family(model, noisy_signsgd, setup, noise=noise, sigma=sigma, vote=vote)


@defaults(MEDIANSGD, uses=USES)
def mediansgd(model: Model, *, noise: str = "gaussian", sigma: float = 0.0,
              setup: Setup = Setup()) -> Algorithm:
    """(Noisy) medianSGD: x_{t+1} = x_t - delta median_i(g_i + sigma xi_i), coordinate-wise.
    sigma may be traced."""
    return _family(model, mediansgd, setup, noise=noise, sigma=sigma)


@defaults(MEDIANSGD, uses=USES)
def noisy_mediansgd(model: Model, *, noise: str = "gaussian", sigma: float = 0.1,
                    setup: Setup = Setup()) -> Algorithm:
    """mediansgd with sigma = 0.1 by default (see noisy_signsgd)."""
    return _family(model, noisy_mediansgd, setup, noise=noise, sigma=sigma)
