"""FedAvg (McMahan et al., AISTATS 2017) and FedOpt (Reddi et al., ICLR 2021).

Round t, sampled clients S_t, client k starts from w_t and runs local SGD on F_k to get w_k:
    Delta_t = sum_k p_k (w_k - w_t) / sum_k p_k,    p_k = n_k (or 1)
    w_{t+1} = ServerOpt(w_t, -Delta_t)
FedAvg is ServerOpt = SGD with lr 1 (w_{t+1} = weighted mean of the w_k). FedAvgM is SGD with
momentum on the pseudo-gradient -Delta_t. FedAdam, FedYogi and FedAdagrad follow Reddi et al.'s
Algorithm 2 (`core.optimizers`): m_t = b1 m_{t-1} + (1 - b1) Delta_t, v_t by the Adam / Yogi /
Adagrad rule from v_{-1} = tau^2, w_{t+1} = w_t + eta m_t / (sqrt(v_t) + tau), no bias correction
(tau = server_eps = 1e-3, b1 = 0.9, b2 = 0.99). Paper vs. optax: optax's bias-corrected Adam and
Yogi and its Adagrad (no momentum, accumulator from 0.1, eps inside the root) are
server_optimizer="adam", "yogi", "adagrad"; the paper's rules are "fedadam", "fedyogi", "fedadagrad".

Stragglers (FedProx's systems heterogeneity): FedAvg drops clients that could not finish their
work from the average (`LocalWork(drop_stragglers=None)` means this default; FedProx keeps them).

Everything else is the round skeleton (core/skeleton.py) with the values of the `Setup`: any
aggregator replaces the weighted mean in Delta_t (median, trimmed_mean, krum, ...), any attack
corrupts the attackers' w_k - w_t or their labels, any uplink compresses what is sent.
"""
from __future__ import annotations

from fedjax_lab.extend import (Algorithm, Model, Optimizer, Setup, defaults, server_averaging)

FEDAVG = Setup(client_opt=Optimizer("sgd", lr=0.01), server_opt=Optimizer("sgd", lr=1.0))


@defaults(FEDAVG)
def fedopt(model: Model, *, setup: Setup = Setup()) -> Algorithm:
    """FedOpt with the setup's client and server optimizers (see module docstring)."""
    return server_averaging(model, setup, fedopt)


@defaults(FEDAVG)
def fedavg(model: Model, *, setup: Setup = Setup()) -> Algorithm:
    """FedAvg: server SGD at lr 1; drops stragglers by default (as in FedProx's study)."""
    return server_averaging(model, setup, fedavg)


def _with_server(alg_name: str, **server):
    """FedOpt whose default server optimizer is Optimizer(**server)."""
    def factory(model: Model, *, setup: Setup = Setup()) -> Algorithm:
        return server_averaging(model, setup, built)
    factory.__name__ = factory.__qualname__ = alg_name
    factory.__doc__ = f"{alg_name}: FedOpt with server optimizer {server} by default (module docstring)."
    built = defaults(Setup(client_opt=Optimizer("sgd", lr=0.01), server_opt=Optimizer(**server)))(factory)
    return built


fedavgm = _with_server("fedavgm", name="sgd", lr=1.0, momentum=0.9)
fedadam = _with_server("fedadam", name="fedadam", lr=0.01)
fedyogi = _with_server("fedyogi", name="fedyogi", lr=0.01)
fedadagrad = _with_server("fedadagrad", name="fedadagrad", lr=0.01)

