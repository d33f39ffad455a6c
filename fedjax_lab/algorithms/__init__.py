"""Algorithms: each a factory returning an Algorithm(init, round, client_params) record.

ALGORITHMS (fedjax_lab.registry) maps a CLI name to (factory, one-line description). The CLI
derives its flags from the factory's keyword-only parameters; an algorithm defined anywhere is
added by `fedjax_lab.register(name, factory)`.
"""
from fedjax_lab.algorithms.ditto import ditto
from fedjax_lab.algorithms.fedamp import fedamp, heurfedamp
from fedjax_lab.algorithms.fedmeta import fedmeta_fomaml, fedmeta_maml, fedmeta_metasgd
from fedjax_lab.algorithms.fedgen import fedgen
from fedjax_lab.algorithms.fedgkt import fedgkt
from fedjax_lab.algorithms.fedproto import fedproto
from fedjax_lab.algorithms.fedavg import fedadagrad, fedadam, fedavg, fedavgm, fedopt, fedyogi
from fedjax_lab.algorithms.fedprox import fedprox
from fedjax_lab.algorithms.fetchsgd import fetchsgd
from fedjax_lab.algorithms.local_topk import local_topk
from fedjax_lab.algorithms.perfedavg import perfedavg_fo, perfedavg_hf
from fedjax_lab.algorithms.pfedhn import pfedhn, pfedhn_pc
from fedjax_lab.algorithms.robust_median import mediansgd, noisy_mediansgd, noisy_signsgd, signsgd
from fedjax_lab.algorithms.scaffold import scaffold
from fedjax_lab.algorithms.fednova import fednova
from fedjax_lab.algorithms.feddyn import feddyn
from fedjax_lab.algorithms.fedbn import fedbn
from fedjax_lab.algorithms.moon import moon
from fedjax_lab.algorithms.qffl import qffl
from fedjax_lab.algorithms.fedper import fedper
from fedjax_lab.algorithms.lg_fedavg import lg_fedavg
from fedjax_lab.algorithms.fedbabu import fedbabu
from fedjax_lab.algorithms.fedrep import fedrep
from fedjax_lab.algorithms.apfl import apfl
from fedjax_lab.algorithms.pfedme import pfedme
from fedjax_lab.algorithms.ifca import ifca
from fedjax_lab.registry import ALGORITHMS, register

ALGORITHMS.update({
    "fedavg": (fedavg, "FedAvg (McMahan et al. 2017): average of local SGD models"),
    "fedopt": (fedopt, "FedOpt (Reddi et al. 2021): any server optimizer on the pseudo-gradient"),
    "fedavgm": (fedavgm, "FedAvgM: FedOpt with server SGD + momentum 0.9"),
    "fedadam": (fedadam, "FedAdam (Reddi et al. 2021, Alg. 2): server Adam, no bias correction, v_-1 = tau^2"),
    "fedyogi": (fedyogi, "FedYogi (Reddi et al. 2021, Alg. 2): server Yogi, no bias correction, v_-1 = tau^2"),
    "fedadagrad": (fedadagrad, "FedAdagrad (Reddi et al. 2021, Alg. 2): server Adagrad with b1 momentum, v_-1 = tau^2"),
    "fedprox": (fedprox, "FedProx (Li et al. 2020): proximal term mu/2||w-w_t||^2, keeps stragglers"),
    "fetchsgd": (fetchsgd, "FetchSGD (Rothchild et al. 2020): count-sketched gradients, momentum and error feedback in sketch space"),
    "local_topk": (local_topk, "Local top-k sparsification with per-client error feedback (FetchSGD's baseline)"),
    "signsgd": (signsgd, "signSGD with majority vote (Bernstein et al. 2019); --sigma > 0: noisy signSGD (Chen et al. 2020)"),
    "noisy_signsgd": (noisy_signsgd, "noisy signSGD (Chen et al. 2020): sign(g + sigma xi) votes track the mean"),
    "mediansgd": (mediansgd, "medianSGD (Yin et al. 2018): coordinate-wise median of client gradients"),
    "noisy_mediansgd": (noisy_mediansgd, "noisy medianSGD (Chen et al. 2020): median of g + sigma xi tracks the mean"),
    "ditto": (ditto, "Ditto (Li et al. 2021): personal v_k on F_k(v) + lam/2||v-w||^2 beside a global model"),
    "fedamp": (fedamp, "FedAMP (Huang et al. 2021): attentive message passing, cloud model per client"),
    "heurfedamp": (heurfedamp, "HeurFedAMP (Huang et al. 2021): FedAMP with cosine attention"),
    "fedmeta_maml": (fedmeta_maml, "FedMeta-MAML (Chen et al. 2018): server Adam on second-order meta-gradients"),
    "fedmeta_fomaml": (fedmeta_fomaml, "FedMeta-FOMAML (Chen et al. 2018): first-order meta-gradients grad L_Q(theta')"),
    "fedmeta_metasgd": (fedmeta_metasgd, "FedMeta-Meta-SGD (Chen et al. 2018): learned per-parameter inner step alpha"),
    "perfedavg_fo": (perfedavg_fo, "Per-FedAvg FO (Fallah et al. 2020): MAML objective f(w - alpha grad f(w)), first-order step"),
    "perfedavg_hf": (perfedavg_hf, "Per-FedAvg HF (Fallah et al. 2020): MAML step with a finite-difference Hessian-vector product"),
    "pfedhn": (pfedhn, "pFedHN (Shamsian et al. 2021): a server hypernetwork generates each client's model from its learned embedding"),
    "pfedhn_pc": (pfedhn_pc, "pFedHN-PC (Shamsian et al. 2021): hypernetwork-generated body, private per-client head"),
    "fedproto": (fedproto, "FedProto (Tan et al. 2022): per-class prototypes + counts up, global prototypes down; clients may differ in architecture"),
    "fedgkt": (fedgkt, "FedGKT (He et al. 2020): small client model + large server model on uploaded features, two-way KL distillation"),
    "fedgen": (fedgen, "FedGen (Zhu et al. 2021): server generator in feature space, distilled from the clients' heads, regularizes local training"),
    "fedbn": (fedbn, "FedBN (Li et al. 2021): FedAvg with every BatchNorm layer (parameters and statistics) kept on its client"),
    "scaffold": (scaffold, "SCAFFOLD (Karimireddy et al. 2020): control variates c_i, c correct client drift"),
    "fednova": (fednova, "FedNova (Wang et al. 2020): updates normalized by ||a_i||_1, server step tau_eff; keeps partial work"),
    "feddyn": (feddyn, "FedDyn (Acar et al. 2021): dynamic regularizer -<g_k, w> + alpha/2||w-w_t||^2, server state h"),
    "moon": (moon, "MOON (Li et al. 2021): CE + mu * model-contrastive loss (local vs global vs previous representation)"),
    "qffl": (qffl, "q-FFL / q-FedAvg (Li et al. 2020): clients with a larger loss F_k weigh more (F_k^q); q = 0 is FedAvg"),
    "fedper": (fedper, "FedPer (Arivazhagan et al. 2019): body averaged, head kept per client"),
    "lg_fedavg": (lg_fedavg, "LG-FedAvg (Liang et al. 2020): local representation (body) per client, head averaged"),
    "fedbabu": (fedbabu, "FedBABU (Oh et al. 2022): head frozen at its random init, body trained and averaged; head fine-tuned for evaluation"),
    "fedrep": (fedrep, "FedRep (Collins et al. 2021): per round head steps (body fixed) then body steps (head fixed); body averaged, head per client"),
    "apfl": (apfl, "APFL (Deng et al. 2020): personalized alpha_i v_i + (1 - alpha_i) w, alpha_i learned by its gradient; alpha = 0 is FedAvg"),
    "pfedme": (pfedme, "pFedMe (T. Dinh et al. 2020): personalized theta_i on f_i + lam/2||theta - w_i||^2 (Moreau envelope), server (1 - beta) w + beta mean w_i"),
    "ifca": (ifca, "IFCA (Ghosh et al. 2020): k cluster models, each client trains the one of lowest loss, averages within clusters"),
})

__all__ = ["fedavg", "fedopt", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "ditto",
           "fedamp", "heurfedamp", "perfedavg_fo", "perfedavg_hf", "fedmeta_maml", "fedmeta_fomaml",
           "fedmeta_metasgd", "pfedhn", "pfedhn_pc", "fedproto", "fedgkt", "fedgen",
           "scaffold", "fednova", "feddyn", "fedbn", "moon", "qffl", "fedper", "lg_fedavg", "fedbabu",
           "fedrep", "apfl", "pfedme", "ifca",
           "ALGORITHMS", "register"]
