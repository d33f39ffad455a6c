"""FedProx (Li et al., MLSys 2020): client k approximately minimizes

    h_k(w; w_t) = F_k(w) + mu/2 * ||w - w_t||^2

and the server averages what it gets. Systems heterogeneity (Sec. 5.2): a fraction `stragglers`
of the sampled clients does a uniformly random number of local epochs (or steps) less than E;
unlike FedAvg, FedProx keeps their partial solutions (its `LocalWork(drop_stragglers=None)`
means keep). mu = 0 with
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
    `np.random.randint(low=1, high=E)`, i.e. [1, E). `LocalWork.straggler_work` (core/setup.py)
    offers both, "code" ([1, E), default) and "paper" ([1, E]).
The `fedjax-lab` demo uses the paper's sampling and averaging.
"""
from __future__ import annotations

from fedjax_lab.algorithms.fedavg import FEDAVG, server_averaging
from fedjax_lab.extend import (Algorithm, Model, Setup, defaults, tree_sq_norm, tree_sub, validate)


def proximal_term(mu):
    """mu/2 ||w - w_t||^2; its gradient mu (w - w_t) pulls local models toward w_t."""
    return lambda w, w_t: 0.5 * mu * tree_sq_norm(tree_sub(w, w_t))


@defaults(FEDAVG)
def fedprox(model: Model, *, mu: float = 0.01, setup: Setup = Setup()) -> Algorithm:
    """FedProx; mu = 0 with stragglers kept is the paper's "FedProx (mu=0)". mu may be traced."""
    validate.non_negative("mu", mu)
    return server_averaging(model, setup, fedprox, objective=proximal_term(mu),
                            drop_stragglers=False)
