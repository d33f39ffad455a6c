"""FedGKT (He, Annavaram, Avestimehr, NeurIPS 2020), CPU-sized: a small client model + a large server
model trained by group knowledge transfer, against the small model alone and FedAvg of the large model.

    python experiments/reproduce/fedgkt.py            # small: digits, 10 clients, 30 rounds, 1 seed
    python experiments/reproduce/fedgkt.py --full     # 20 clients, 60 rounds, 3 seeds

Data: scikit-learn digits (1,797 real 8x8 images, no download), Dirichlet(1.0) label skew, every
client holds out 25% of its examples as its test split. Models (models/gkt.py): the client's small
model is one 3x3 convolution of 8 channels (f_e) + global average pooling + linear (f_c), 170
parameters; the server's model f_s takes the 8x8x8 feature map (3x3 conv of 16, a ReLU layer of 64,
the output layer). Every row uses the same client work: all clients every round (Algorithm 1),
1 local epoch of batch 10 with Adam (lr 0.03). Rows (test accuracy on the clients' own test splits):
  FedGKT (pair)            f_s(f_e^(k)(x)): the client's extractor with the server's model
  FedGKT (client alone)    f_c(f_e^(k)(x)): the client's small model trained by FedGKT
  local only (small)       the small model trained alone on CE (FedGKT with alpha = 0)
  FedAvg (small)           FedAvg of the small model
  FedAvg (large)           FedAvg of the large model f_s o f_e (what every client would train)
Client compute per round: FLOPs of the client's local SGD steps (forward, backward and optimizer
update of one step, from XLA's cost analysis `jax.jit(step).lower(...).compile().cost_analysis()`,
times the number of steps) plus FedGKT's forward pass that extracts the features of the client's
data, for a client of the mean size; against the same local steps of FedAvg of the large model.
Bytes per round are the algorithms' own `bytes_up + bytes_down` metrics (FedGKT: features, logits
and labels up, server logits down; FedAvg: the model both ways).

PASS: the pair is at least 5 points more accurate than every small-model row, and FedGKT's client
FLOPs per round are at least 9x fewer than FedAvg of the large model's (the paper's 9-17x).
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab import Optimizer, Setup
from fedjax_lab import data as D
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.fedgkt import client_alone_sums, fedgkt, kl_t
from fedjax_lab.core import driver, evaluate
from fedjax_lab.core.setup import Cohort, LocalWork
from fedjax_lab.models import gkt
from fedjax_lab.reproduce import finish, output_paths, protocol_parser

CLAIM = ("FedGKT's small client model plus a large server model trained on its features is more "
         "accurate than the small model trained alone or by FedAvg, at 9x or more fewer client FLOPs "
         "per round than FedAvg of the large model (He et al., NeurIPS 2020: 9-17x).")

ROWS = (("pair", "FedGKT (pair)", "o-"), ("client", "FedGKT (client alone)", "s--"),
        ("local", "local only (small)", "^:"), ("fedavg_small", "FedAvg (small)", "v:"),
        ("fedavg_large", "FedAvg (large)", "x-"))


def cost_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def client_flops(pair, tx, x, batch_size: int, steps: int, n: int, T: float) -> dict:
    """Client FLOPs per round: FedGKT (steps on CE + KL, then features + logits of n examples) and
    FedAvg of the large model (steps on CE of f_s o f_e)."""
    client = pair.client
    xb, yb = x[:batch_size], jnp.zeros(batch_size, jnp.int32)
    zs = jnp.zeros((batch_size, 10))
    pc = client.init(jax.random.key(0), xb)
    pp = pair.init(jax.random.key(0), xb)

    def step(model, params, loss):
        def f(p, o):
            g = jax.grad(loss)(p)
            u, o = tx.update(g, o, p)
            return optax.apply_updates(p, u), o
        return cost_flops(f, params, tx.init(params))
    gkt_step = step(client, pc, lambda p: jnp.mean(
        client.loss(client.apply(p, xb), yb) + kl_t(zs, client.apply(p, xb), T)))
    large_step = step(pair, pp, lambda p: jnp.mean(pair.loss(pair.apply(p, xb), yb)))
    extract = cost_flops(lambda p, v: client.head(p, client.features(p, v)), pc, x[:n])
    return dict(fedgkt=steps * gkt_step + extract, fedavg_large=steps * large_step,
                fedgkt_step=gkt_step, large_step=large_step, extract=extract)


def main(argv=None):
    ap = protocol_parser(__doc__)
    ap.add_argument("--rounds", type=int, default=None, help="30; --full 60")
    ap.add_argument("--eval-every", type=int, default=10)
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (60 if args.full else 30)
    args.seeds = args.seeds or (3 if args.full else 1)
    num_clients = 20 if args.full else 10
    figure, metrics_path = output_paths(args.out, "fedgkt", args.full)

    data = D.digits(num_clients=num_clients, partition="dirichlet=1.0", seed=0, test_fraction=0.25)
    pair = gkt.gkt_pair(10, server_channels=(16,), hidden=64)
    opt = Optimizer("adam", lr=0.03, b2=0.999, eps=1e-8)
    work = LocalWork(batch_size=10, epochs=1)
    setup = Setup(cohort=Cohort(clients_per_round=num_clients), work=work, client_opt=opt)
    small_setup = Setup(cohort=setup.cohort, work=work, client_opt=opt)
    algs = {"fedgkt": fedgkt(pair, alpha=1.0, server_batch_size=64, setup=setup),
            "local": fedgkt(pair, alpha=0.0, server_batch_size=64, setup=setup),
            "fedavg_small": fedavg(pair.client, setup=small_setup),
            "fedavg_large": fedavg(pair, setup=small_setup)}
    chunks = args.rounds // args.eval_every
    curves = {row: [[] for _ in range(chunks)] for row, _, _ in ROWS}
    bytes_per_round = {}
    t0 = time.time()
    for name, alg in algs.items():
        for seed in range(args.seeds):
            state = alg.init(jax.random.key(seed), data)
            for c in range(chunks):
                state, m = driver.run_rounds(alg, state, data, jax.random.key(seed + 100),
                                             jnp.int32(c * args.eval_every), args.eval_every)
                sums = driver.evaluate(alg, state, data)
                if name in ("fedgkt", "local"):
                    got = {"pair" if name == "fedgkt" else "local_pair":
                           sums["test_personal"],
                           "client" if name == "fedgkt" else "local":
                           client_alone_sums(alg, state, data.test)}
                else:
                    got = {name: sums["test"]}
                for row, s in got.items():
                    if row in curves:
                        curves[row][c].append(evaluate.summarize("t", *jax.device_get(s))["t_accuracy"])
            bytes_per_round[name] = float(np.mean(np.asarray(m["bytes_up"]) + np.asarray(m["bytes_down"])))
        print(f"{name:>13} done [{time.time() - t0:.0f} s]", flush=True)

    n_mean = int(round(float(np.mean(np.asarray(data.client_sizes)))))
    steps = math.ceil(work.epochs * n_mean / work.batch_size)
    flops = client_flops(pair, opt.build(), data.x, work.batch_size, steps, n_mean, 3.0)
    ratio = flops["fedavg_large"] / flops["fedgkt"]
    rounds = [(c + 1) * args.eval_every for c in range(chunks)]
    final = {row: np.asarray(curves[row][-1]) for row, _, _ in ROWS}
    print(f"\ntest accuracy after {args.rounds} rounds, {args.seeds} seed(s), {num_clients} clients "
          f"(digits, Dirichlet 1.0), mean ± std over seeds")
    for row, label, _ in ROWS:
        print(f"{label:>24} {final[row].mean():.3f} ± {final[row].std():.3f}")
    print(f"\nclient FLOPs per round (mean client, {n_mean} examples, {steps} steps of batch "
          f"{work.batch_size}; XLA cost analysis):")
    print(f"{'FedGKT':>24} {flops['fedgkt']:.3e}   ({flops['fedgkt_step']:.3e} per step, "
          f"{flops['extract']:.3e} feature extraction)")
    print(f"{'FedAvg (large)':>24} {flops['fedavg_large']:.3e}   ({flops['large_step']:.3e} per step)")
    print(f"{'ratio':>24} {ratio:.1f}x fewer with FedGKT")
    print("\nbytes per round (all clients, up + down):")
    for name, b in bytes_per_round.items():
        print(f"{name:>24} {b:.3e}")
    numbers = {f"{row} accuracy": float(final[row].mean()) for row, _, _ in ROWS}
    numbers.update({f"{row} accuracy std": float(final[row].std()) for row, _, _ in ROWS})
    numbers.update({"client flops fedgkt": flops["fedgkt"], "client flops fedavg large":
                    flops["fedavg_large"], "client flops ratio": ratio})
    numbers.update({f"bytes per round {k}": v for k, v in bytes_per_round.items()})
    best_small = max(numbers[f"{r} accuracy"] for r in ("client", "local", "fedavg_small"))
    passed = numbers["pair accuracy"] >= best_small + 0.05 and ratio >= 9.0
    plot(rounds, curves, figure)
    print(f"wrote {figure} and {metrics_path}")
    return finish(CLAIM, numbers, passed, metrics_path,
                  extra=dict(args=vars(args), rounds=rounds, curves=curves, flops=flops))


def plot(rounds, curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for row, label, style in ROWS:
        acc = np.asarray(curves[row])                 # [evals, seeds]
        ax.plot(rounds, acc.mean(1), style, label=label, markersize=4)
        if acc.shape[1] > 1:
            ax.fill_between(rounds, acc.min(1), acc.max(1), alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (clients' own test splits)")
    ax.set_title("FedGKT on digits (Dirichlet 1.0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
