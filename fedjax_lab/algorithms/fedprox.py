"""FedProx (Li et al., MLSys 2020): client k approximately minimizes

    h_k(w; w_t) = F_k(w) + mu/2 * ||w - w_t||^2

and the server averages what it gets. Systems heterogeneity (Sec. 5.2): a fraction `stragglers`
of the sampled clients does a uniformly random number of local epochs (or steps) less than E;
unlike FedAvg, FedProx keeps their partial solutions (`drop_stragglers=False`). mu = 0 with
stragglers kept is "FedProx (mu=0)" of the paper.

Paper vs. code:
  * Sampling and averaging. The paper (Algorithm 2) samples K devices with p_k = n_k / n *with
    replacement* and averages uniformly, w_{t+1} = (1/K) sum_k w_k (`sampling="size",
    weighting="uniform"`; a device drawn twice counts twice). The official code
    (litian96/FedProx, `BaseFedarated.select_clients`) samples uniformly *without* replacement,
    `np.random.choice(range(N), K, replace=False)` (its docstring says "weighted by number of
    samples", its code does not), and averages by n_k (`sampling="uniform",
    weighting="examples"`, our default). `sampling="size_distinct"` (distinct clients drawn by
    size) is neither and is biased under a uniform average (core/sampling.py).
  * Straggler work. The paper draws a straggler's epochs uniformly from [1, E]; the code uses
    `np.random.randint(low=1, high=E)`, i.e. [1, E). `LocalWork.straggler_work` (core/rounds.py)
    offers both, "code" ([1, E), default) and "paper" ([1, E]).
The `fedjax-lab` demo uses the paper's sampling and averaging.
"""
from __future__ import annotations

from typing import Optional

from fedjax_lab.algorithms.fedavg import fedopt
from fedjax_lab.core import validate
from fedjax_lab.core.tree import tree_sq_norm, tree_sub
from fedjax_lab.core.types import Algorithm, Model


def proximal_term(mu: float):
    """mu/2 ||w - w_t||^2; its gradient mu (w - w_t) pulls local models toward w_t."""
    return lambda w, w_t: 0.5 * mu * tree_sq_norm(tree_sub(w, w_t))


def fedprox(model: Model, *, mu: float = 0.01, client_lr: float = 0.01, client_optimizer="sgd",
            client_momentum: float = 0.0, server_optimizer="sgd", server_lr: float = 1.0,
            clients_per_round: int = 10, local_steps: int = 20, epochs: Optional[int] = None,
            batch_size: int = 10, stragglers: float = 0.0, drop_stragglers: bool = False,
            sampling: str = "uniform", weighting: str = "examples",
            shuffle: str = "auto", aggregator: str = "mean", trim_beta: float = 0.1,
            krum_f: int = 1, krum_m: int = 1, clip_norm: float = 1.0, gm_iters: int = 10,
            attack: str = "none", attack_fraction: float = 0.0,
            attack_scale: Optional[float] = None, attack_seed: int = 0) -> Algorithm:
    """FedProx; every keyword is a hyperparameter (and a CLI flag)."""
    validate.non_negative("mu", mu)
    alg = fedopt(model, client_optimizer=client_optimizer, client_lr=client_lr,
                 client_momentum=client_momentum, server_optimizer=server_optimizer,
                 server_lr=server_lr, clients_per_round=clients_per_round,
                 local_steps=local_steps, epochs=epochs, batch_size=batch_size,
                 stragglers=stragglers, drop_stragglers=drop_stragglers, sampling=sampling,
                 weighting=weighting, shuffle=shuffle, aggregator=aggregator, trim_beta=trim_beta,
                 krum_f=krum_f, krum_m=krum_m, clip_norm=clip_norm, gm_iters=gm_iters,
                 attack=attack, attack_fraction=attack_fraction, attack_scale=attack_scale,
                 attack_seed=attack_seed, extra_loss=proximal_term(mu), name="fedprox")
    alg.config["mu"] = mu
    return alg
