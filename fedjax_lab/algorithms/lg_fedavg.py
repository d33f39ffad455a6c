"""LG-FedAvg (Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency, "Think Locally,
Act Globally: Federated Learning with Local and Global Representations", arXiv:2001.01523, 2020,
Sec. 3 and Algorithm 1).

The mirror of FedPer: each client k keeps its local representation (the body, `features`:
theta_k^l, a row) and all clients share the global model on top of it (the head, theta^g):

    client k:  (theta_k^l, theta_k^g) <- local SGD on F_k from (theta_k^l, theta^g_t)   both train
    server:    theta^g_{t+1} = sum_k n_k theta_k^g / sum_k n_k                only theta^g is sent
    deploy:    client k uses (theta_k^l, theta^g_t)                 (client_params: personalized)

Only the head travels (its bytes up and down), which is the paper's communication claim.
`local_representation=False` shares the body too, which is FedAvg exactly (the ablation).

Paper vs. code (pliang279/LG-FedAvg, main_lg.py): the code starts from a model pre-trained by
FedAvg and keeps the *last* `num_layers_keep` layers global (`w_glob_keys`), evaluating every
client on its own local model; here training starts from the random initialization (the paper's
Algorithm 1; the code's pre-training is a FedAvg run before it) and the global part is the
model's head (algorithms/_split.py). All clients start from one random model, as in the code.
"""
from __future__ import annotations

from fedjax_lab.algorithms._split import keep_on_client
from fedjax_lab.extend import Setup, defaults, server_averaging, validate


@defaults(Setup(), model="mlp")
def lg_fedavg(model, *, local_representation: bool = True, setup: Setup = Setup()):
    """LG-FedAvg (module docstring): the head averaged, the body a per-client row;
    local_representation=False is FedAvg."""
    validate.one_of("local_representation", local_representation, {True, False})
    local_split = keep_on_client(model, "body")
    if not local_representation:
        return server_averaging(model, setup, lg_fedavg, local_representation=False)
    return server_averaging(model, setup, lg_fedavg, local_representation=True,
                            local_split=local_split)
