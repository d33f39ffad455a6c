"""FedBN's claim (Li et al., ICLR 2021, Table 2 / Fig. 4), CPU-sized: under feature shift (clients
from different input domains, the same labels), keeping BatchNorm layers local beats FedAvg,
which shares them.

    python experiments/reproduce/fedbn.py               # small: digits, 4 domains, 20 clients, 40 rounds
    python experiments/reproduce/fedbn.py --full        # 8 domains, 40 clients, 100 rounds, 3 seeds

Data: scikit-learn digits (offline), labels split iid over the clients, client k in domain
k mod K with that domain's contrast and brightness (`digits:iid,...,domains=K`, data/shift.py;
FedBN's own domains are five digit datasets). Model: the MLP with BatchNorm (`mlp_bn`, hidden 64).
Every client takes part in every round, as in the paper's experiments. FedBN is measured by each
client's own model (shared layers + its BatchNorm layers) on its test split, FedAvg by the global
model (FedBN's `local_bn=False`, which is FedAvg exactly). PASS: FedBN's mean client accuracy is
above FedAvg's at every seed.
"""
from __future__ import annotations

import time

import numpy as np

import fedjax_lab as fl
from fedjax_lab.reproduce import default_of, fill_sizes, finish, output_paths, protocol_parser

CLAIM = ("Local BatchNorm layers (FedBN) beat FedAvg's shared ones when clients' input "
         "distributions differ (feature shift), with the same model and setup (Li et al., ICLR 2021).")


def main(argv=None) -> dict:
    p = protocol_parser(__doc__)
    p.add_argument("--domains", type=int, default=None)
    p.add_argument("--clients", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    args = fill_sizes(p.parse_args(argv), small=dict(domains=4, clients=20, rounds=40, seeds=1),
                      full=dict(domains=8, clients=40, rounds=100, seeds=3))
    fig_path, metrics_path = output_paths(args.out, "fedbn", args.full)
    flat = {k: default_of(fl.algorithms.fedbn, k) for k in ("client_lr", "local_steps", "batch_size")}
    acc = {"fedbn": [], "fedavg": []}
    start = time.time()
    for seed in range(args.seeds):
        data = fl.data.load(f"digits:iid,clients={args.clients},domains={args.domains}", seed=seed)
        model = fl.models.get("mlp_bn", 10, data.x[:1], hidden=(64,))
        setup = fl.Setup.of(clients_per_round=args.clients, **flat)
        for local_bn, name in ((True, "fedbn"), (False, "fedavg")):
            h = fl.run(fl.algorithms.fedbn(model, local_bn=local_bn, setup=setup), data,
                       rounds=args.rounds, key=seed, eval_every=args.rounds,
                       progress=False).history[-1]
            acc[name].append(h["test_personal_accuracy_client_mean"] if local_bn
                             else h["test_accuracy_client_mean"])
    numbers = {f"{n}_mean_client_accuracy": float(np.mean(v)) for n, v in acc.items()}
    numbers["gap"] = numbers["fedbn_mean_client_accuracy"] - numbers["fedavg_mean_client_accuracy"]
    passed = all(b > a for b, a in zip(acc["fedbn"], acc["fedavg"]))
    print(f"{args.domains} domains, {args.clients} clients, {args.rounds} rounds, "
          f"{args.seeds} seed(s), {time.time() - start:.0f} s")
    for name, v in acc.items():
        print(f"  {name:<7} mean client accuracy {np.mean(v):.3f}  per seed {np.round(v, 3).tolist()}")
    print(("PASS: " if passed else "FAIL: ") + CLAIM)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(["FedAvg (shared BN)", "FedBN (local BN)"], [np.mean(acc["fedavg"]), np.mean(acc["fedbn"])])
    ax.set_ylabel("mean client test accuracy")
    ax.set_title(f"digits, {args.domains} input domains")
    fig.tight_layout()
    fig.savefig(fig_path, dpi=120)
    return finish(CLAIM, numbers, passed, metrics_path, extra=dict(per_seed=acc))


if __name__ == "__main__":
    main()
