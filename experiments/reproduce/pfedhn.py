"""pFedHN / pFedHN-PC (Shamsian et al., ICML 2021), CPU-sized: personalized test accuracy vs rounds
for pFedHN, pFedHN-PC, FedAvg (global model), FedAvg + fine-tuning, Per-FedAvg (FO) and local-only,
on 2-labels-per-client digits and MNIST-1D; new clients (phi frozen, a fresh embedding learned);
bytes per round; the hypernetwork's size for the FedAvg CNN target and the memory of a round at
1,000 clients of the MLP target.

    python experiments/reproduce/pfedhn.py            # small: ~16 min on 2 busy CPU cores
    python experiments/reproduce/pfedhn.py --full     # more clients and rounds (the paper's 50
                                                      # clients per dataset, 1,000 rounds)

Protocol (core/meta.py): 50 clients (shards, 2 labels each); client roles 80 / 0 / 20: 40 train,
10 are new clients never seen in training. Each training client's train split is cut into a fit
split (85%, what every method trains on) and a validation split (15%); the official trainer's
"best validation step" accuracy is the test accuracy at the evaluation with the best pooled
validation accuracy. Accuracy is reported pooled (sum correct / sum n over clients: the official
metric) and as the mean over clients. Rows:
  pFedHN / pFedHN-PC   h(e_i) (PC: + the private head) on client i's test split
  FedAvg               the global model
  FedAvg + FT          FedAvg's model after `--ft-steps` SGD steps on the client's fit split
  Per-FedAvg           Per-FedAvg FO's model after its one alpha-step on the fit split
  Local                a model trained from scratch on the client's fit split alone
New clients: pFedHN learns only a fresh embedding (PC: and a head) on the new client's train split;
FedAvg + FT and Per-FedAvg adapt as above; local-only trains on it. Recovery = new-client pooled
accuracy / training-client pooled accuracy.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import Optimizer, Setup, models
from fedjax_lab import data as D
from fedjax_lab.algorithms import fedavg, perfedavg_fo
from fedjax_lab.algorithms.pfedhn import pfedhn, pfedhn_pc
from fedjax_lab.core import driver, meta
from fedjax_lab.core.setup import Cohort, LocalWork
from fedjax_lab.reproduce import finish, output_paths, protocol_parser

CLAIM = ("pFedHN's generated models beat FedAvg's global model on per-client test accuracy on "
         "2-labels-per-client digits and MNIST-1D, and new clients that learn only an embedding "
         "recover most (>= 75%) of the training clients' accuracy")
RECOVERY = 0.75
ROWS = (("pfedhn", "pFedHN", "o-"), ("pfedhn_pc", "pFedHN-PC", "s-"), ("fedavg", "FedAvg", "^--"),
        ("fedavg_ft", "FedAvg + FT", "v--"), ("perfedavg", "Per-FedAvg FO", "x:"),
        ("local", "Local only", "k-."))


def local_only(model, *, steps, batch_size, lr, seed):
    """adapt(params0, split, ids): each client trains params0 (model.init's) on its own split only,
    `steps` SGD steps with momentum 0.9 (no federation)."""
    return meta.finetune(model, Optimizer("sgd", lr=lr, momentum=0.9), steps=steps,
                         batch_size=batch_size, seed=seed)


def datasets(full: bool, seed: int):
    n = 50
    digits = D.digits(num_clients=n, partition="shards=2", seed=seed, test_fraction=0.25)
    m1d = D.mnist1d(num_clients=n, partition="shards=2", seed=seed,
                    num_samples=10000 if full else 5000)
    return {"digits": (digits, models.mlp(10, hidden=(64,))),
            "mnist1d": (m1d, models.mlp(10, hidden=(128, 128)))}


def run_dataset(name, d, model, args, seed):
    train_ids, _, new_ids = meta.client_roles(d.num_clients, (0.8, 0.0, 0.2), seed=seed)
    train, new = meta.select_clients(d, train_ids), meta.select_clients(d, new_ids)
    fit, val = meta.split_support_query(train, support_fraction=0.85, seed=seed)
    work = LocalWork(batch_size=16, local_steps=args.local_steps)
    hn_setup = Setup(cohort=Cohort(args.clients_per_round, weighting="uniform"), work=work,
                     client_opt=Optimizer("sgd", lr=args.inner_lr, momentum=0.9),
                     server_opt=Optimizer("sgd", lr=args.server_lr, momentum=0.9))
    fl_setup = Setup(cohort=Cohort(args.clients_per_round, weighting="uniform"), work=work,
                     client_opt=Optimizer("sgd", lr=args.fedavg_lr))
    pfa = perfedavg_fo(model, inner_lr=args.inner_lr_perfedavg, setup=Setup(
        cohort=Cohort(args.clients_per_round), work=LocalWork(batch_size=16,
                                                              local_steps=max(1, args.local_steps // 3)),
        client_opt=Optimizer("sgd", lr=args.fedavg_lr)))
    algs = {"pfedhn": pfedhn(model, setup=hn_setup), "pfedhn_pc": pfedhn_pc(model, setup=hn_setup),
            "fedavg": fedavg(model, setup=fl_setup), "perfedavg": pfa}
    own = lambda alg: (lambda st, sup, ids: alg.client_params(st, ids))
    ft = meta.finetune(model, Optimizer("sgd", lr=args.fedavg_lr), steps=args.ft_steps,
                       batch_size=16, params_of=lambda st: st.params)
    glob = meta.no_adapt(lambda st: st.params)
    evals = {"pfedhn": [("pfedhn", own(algs["pfedhn"]))],
             "pfedhn_pc": [("pfedhn_pc", own(algs["pfedhn_pc"]))],
             "fedavg": [("fedavg", glob), ("fedavg_ft", ft)], "perfedavg": [("perfedavg", pfa.adapt)]}
    new_adapt = {"pfedhn": algs["pfedhn"].new_client(steps=args.new_steps, lr=args.new_lr),
                 "pfedhn_pc": algs["pfedhn_pc"].new_client(steps=args.new_steps, lr=args.new_lr),
                 "fedavg": glob, "fedavg_ft": ft, "perfedavg": pfa.adapt}
    curves = {r: {"test": [], "val": []} for r, _, _ in ROWS if r != "local"}
    final, bytes_per_round = {}, {}
    chunks = args.rounds // args.eval_every
    for alg_name, alg in algs.items():
        t0 = time.time()
        state = jax.jit(alg.init)(jax.random.key(seed), fit)
        for c in range(chunks):
            state, m = driver.run_rounds(alg, state, fit, jax.random.key(seed + 1000),
                                         jnp.int32(c * args.eval_every), args.eval_every)
            for row, adapt in evals[alg_name]:
                support = fit
                te = meta.adapted_evaluation(model, adapt, state, support, train.test, prefix="t")
                va = meta.adapted_evaluation(model, adapt, state, support, val, prefix="v")
                curves[row]["test"].append((te["t_accuracy"], te["t_accuracy_client_mean"]))
                curves[row]["val"].append(va["v_accuracy"])
        bytes_per_round[alg_name] = float(m["bytes_up"][-1] + m["bytes_down"][-1])
        for row, _ in evals[alg_name]:
            te = curves[row]["test"]
            best = int(np.argmax(curves[row]["val"]))
            nw = meta.adapted_evaluation(model, new_adapt[row], state, new, new.test, prefix="n")
            final[row] = dict(pooled=te[-1][0], client_mean=te[-1][1], best_val_pooled=te[best][0],
                              new_pooled=nw["n_accuracy"], new_client_mean=nw["n_accuracy_client_mean"])
        print(f"  {name} {alg_name:>10} done [{time.time() - t0:.0f} s]", flush=True)
    loc = local_only(model, steps=args.local_only_steps, batch_size=16, lr=args.fedavg_lr,
                     seed=seed)
    p0 = model.init(jax.random.key(seed), d.x[:1])
    te = meta.adapted_evaluation(model, loc, p0, fit, train.test, prefix="t")
    nw = meta.adapted_evaluation(model, loc, p0, new, new.test, prefix="n")
    final["local"] = dict(pooled=te["t_accuracy"], client_mean=te["t_accuracy_client_mean"],
                          best_val_pooled=te["t_accuracy"], new_pooled=nw["n_accuracy"],
                          new_client_mean=nw["n_accuracy_client_mean"])
    return curves, final, bytes_per_round


def memory_report(full: bool) -> dict:
    """Parameters of h for the FedAvg CNN target (both generators), and the compiled memory of one
    round at 1,000 clients of the MLP target (784-200-200-10) on 28x28 inputs (XLA's own
    memory analysis of the compiled round: nothing is run)."""
    out = {}
    cnn = models.cnn(10)
    img = jnp.zeros((1, 28, 28, 1))
    for gen in ("per_leaf", "chunked"):
        out[f"cnn_h_params_{gen}"] = float(pfedhn(cnn, generator=gen).hypernet(img, 50).num_params)
    out["cnn_target_params"] = float(sum(x.size for x in jax.tree.leaves(
        jax.eval_shape(cnn.init, jax.random.key(0), img))))
    clients = 1000
    x = np.zeros((clients * 20, 28, 28, 1), np.float32)
    y = np.tile(np.arange(10, dtype=np.int32), clients * 2)
    d = D.federated_arrays(x, y, np.arange(0, clients * 20 + 1, 20), num_classes=10)
    alg = pfedhn(models.mlp(10), setup=Setup(cohort=Cohort(clients),
                                             work=LocalWork(batch_size=20, local_steps=5)))
    state = jax.eval_shape(alg.init, jax.random.key(0), d)
    compiled = jax.jit(alg.round).lower(state, d, jax.random.key(1)).compile()
    mem = compiled.memory_analysis()
    out["mlp_1000_clients_temp_bytes"] = float(mem.temp_size_in_bytes)
    out["mlp_1000_clients_argument_bytes"] = float(mem.argument_size_in_bytes)
    out["mlp_1000_clients_output_bytes"] = float(mem.output_size_in_bytes)
    out["mlp_h_params"] = float(alg.hypernet(d.x[:1], clients).num_params)
    return out


def main(argv=None) -> dict:
    ap = protocol_parser(__doc__, seeds=1)
    ap.add_argument("--no-memory", action="store_true", help="skip the memory report")
    ap.add_argument("--rounds", type=int, default=None, help="default 200 (--full: 1000)")
    args = ap.parse_args(argv)
    args.seeds = args.seeds or 1
    rounds, args.eval_every = (1000, 50) if args.full else (200, 25)
    args.rounds = args.rounds or rounds
    args.eval_every = min(args.eval_every, args.rounds)
    args.clients_per_round, args.local_steps = 10, 20
    args.inner_lr, args.server_lr, args.fedavg_lr = 0.05, 0.05, 0.05
    args.inner_lr_perfedavg, args.ft_steps, args.local_only_steps = 0.05, 20, 200
    args.new_steps, args.new_lr = 100, 0.05
    results = {}
    for seed in range(args.seeds):
        for name, (d, model) in datasets(args.full, seed).items():
            results.setdefault(name, []).append(run_dataset(name, d, model, args, seed))
    numbers, table = {}, []
    for name, runs in results.items():
        for row, label, _ in ROWS:
            f = {k: float(np.mean([r[1][row][k] for r in runs])) for k in runs[0][1][row]}
            for k, v in f.items():
                numbers[f"{name}/{row}/{k}"] = v
            table.append((name, label, f))
        for alg_name, b in runs[0][2].items():
            numbers[f"{name}/{alg_name}/bytes_per_round"] = b
    passed = True
    for name in results:
        hn, fa = numbers[f"{name}/pfedhn/pooled"], numbers[f"{name}/fedavg/pooled"]
        rec = numbers[f"{name}/pfedhn/new_pooled"] / hn
        numbers[f"{name}/pfedhn/new_recovery"] = rec
        numbers[f"{name}/pfedhn_pc/new_recovery"] = (numbers[f"{name}/pfedhn_pc/new_pooled"]
                                                     / numbers[f"{name}/pfedhn_pc/pooled"])
        passed &= hn > fa and rec >= RECOVERY
    if not args.no_memory:
        numbers.update({f"memory/{k}": v for k, v in memory_report(args.full).items()})
    print(f"\npersonalized test accuracy after {args.rounds} rounds, {args.seeds} seed(s) "
          "(pooled = sum correct / sum n; mean = over clients; best-val = at the best validation eval)")
    print(f"{'data':>8} {'method':>14} {'pooled':>7} {'mean':>7} {'best-val':>8} "
          f"{'new pooled':>10} {'new mean':>8}")
    for name, label, f in table:
        print(f"{name:>8} {label:>14} {f['pooled']:7.3f} {f['client_mean']:7.3f} "
              f"{f['best_val_pooled']:8.3f} {f['new_pooled']:10.3f} {f['new_client_mean']:8.3f}")
    for k, v in numbers.items():
        if "bytes" in k or "memory" in k or "recovery" in k:
            print(f"{k:>48} {v:,.3f}")
    figure, metrics = output_paths(args.out, "pfedhn", args.full)
    plot(results, args, figure)
    print(f"claim: {CLAIM}\npassed: {bool(passed)}\nwrote {figure} and {metrics}")
    return finish(CLAIM, numbers, passed, metrics)


def plot(results, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rounds = [(c + 1) * args.eval_every for c in range(args.rounds // args.eval_every)]
    fig, axes = plt.subplots(1, len(results), figsize=(4.8 * len(results), 3.6), sharey=True)
    for ax, (name, runs) in zip(np.atleast_1d(axes), results.items()):
        for row, label, style in ROWS:
            if row == "local":
                acc = np.mean([r[1]["local"]["pooled"] for r in runs])
                ax.axhline(acc, color="k", ls="-.", lw=1, label=label)
                continue
            acc = np.mean([[t[0] for t in r[0][row]["test"]] for r in runs], axis=0)
            ax.plot(rounds, acc, style, label=label, markersize=4)
        ax.set_title(f"{name}, 2 labels/client (40 training clients)")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("personalized test accuracy (pooled)")
    np.atleast_1d(axes)[-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
