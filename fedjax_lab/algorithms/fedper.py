"""FedPer (Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with Personalization
Layers", arXiv:1912.00818, 2019, Sec. 3 and Algorithm 1).

The model is split into base layers W_B (the body, `features`) and personalization layers W_{P_k}
(the head, one per client k: a row):

    client k:  (W_B,k, W_{P_k}) <- E local SGD steps on F_k from (W_B^t, W_{P_k})   both parts train
    server:    W_B^{t+1} = sum_k n_k W_B,k / sum_k n_k                            only W_B is sent
    deploy:    client k uses (W_B^t, W_{P_k})                       (client_params: personalized)

A client that has not trained yet holds the initial head (all clients start from the same random
head, as in the paper where every client is initialized from one model). The global model's head
(`global_params`) stays at its initial value. `personal_head=False` shares the head too, which is
FedAvg exactly (the ablation).

Paper vs. code: the paper has no official code; PFLlib's FedPer (clientper / serverper) trains the
whole model locally and uploads the base only, the rule above. Which layers are the head is the
model's split (algorithms/_split.py: the zoo's mlp "out", cnn "fc").
"""
from __future__ import annotations

from fedjax_lab.algorithms._split import keep_on_client
from fedjax_lab.extend import Setup, defaults, server_averaging, validate


@defaults(Setup(), model="mlp")
def fedper(model, *, personal_head: bool = True, setup: Setup = Setup()):
    """FedPer (module docstring): the body averaged, the head a per-client row;
    personal_head=False is FedAvg."""
    validate.one_of("personal_head", personal_head, {True, False})
    local_split = keep_on_client(model, "head")
    if not personal_head:
        return server_averaging(model, setup, fedper, personal_head=False)
    return server_averaging(model, setup, fedper, personal_head=True, local_split=local_split)
