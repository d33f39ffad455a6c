"""Algorithms: each a factory returning an Algorithm(init, round, client_params) record.

ALGORITHMS maps a CLI name to (factory, one-line description). The CLI derives its flags from the
factory's keyword-only parameters, so adding an algorithm is one line here.
"""
import functools

from fedjax_lab.algorithms.fedavg import fedavg, fedopt
from fedjax_lab.algorithms.fedprox import fedprox

fedavgm = functools.partial(fedopt, server_optimizer="sgd", server_momentum=0.9, name="fedavgm")
fedadam = functools.partial(fedopt, server_optimizer="adam", server_lr=0.01, name="fedadam")
fedyogi = functools.partial(fedopt, server_optimizer="yogi", server_lr=0.01, name="fedyogi")
fedadagrad = functools.partial(fedopt, server_optimizer="adagrad", server_lr=0.01, name="fedadagrad")

ALGORITHMS = {
    "fedavg": (fedavg, "FedAvg (McMahan et al. 2017): average of local SGD models"),
    "fedopt": (fedopt, "FedOpt (Reddi et al. 2021): any server optimizer on the pseudo-gradient"),
    "fedavgm": (fedavgm, "FedAvgM: FedOpt with server SGD + momentum 0.9"),
    "fedadam": (fedadam, "FedAdam: FedOpt with server Adam"),
    "fedyogi": (fedyogi, "FedYogi: FedOpt with server Yogi"),
    "fedadagrad": (fedadagrad, "FedAdagrad: FedOpt with server Adagrad"),
    "fedprox": (fedprox, "FedProx (Li et al. 2020): proximal term mu/2||w-w_t||^2, keeps stragglers"),
}

__all__ = ["fedavg", "fedopt", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "ALGORITHMS"]
