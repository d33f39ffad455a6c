"""FedNova (Wang, Liu, Liang, Joshi, Poor, NeurIPS 2020), the objective-inconsistency example
(Sec. 3), exact: quadratics F_i(x) = 1/2 ||x - a_i||^2 with heterogeneous local work tau_i.

Setting: M clients, client i holds tau_i copies of its center a_i (random, seeded), so with
epochs=1, batch_size=1 it takes exactly tau_i local GD steps of lr eta and p_i = n_i / n; full
participation, FedAvg keeps the partial work (drop_stragglers=False). After tau_i steps
y_i - a_i = q_i (x - a_i), q_i = (1 - eta)^tau_i, so both fixed points have closed forms:

    FedAvg:   x = sum w_i a_i / sum w_i,   w_i = p_i (1 - q_i)          -> p_i tau_i  (eta -> 0)
    FedNova:  the same with                w_i = p_i (1 - q_i) / tau_i  -> p_i
    the minimizer of sum p_i F_i:          x* = sum p_i a_i

PASS: for every eta both runs end on their closed forms (to 1e-4 of ||x_FedAvg - x*||); at the
smallest eta FedNova's distance to x* is under a tenth of FedAvg's; FedNova's distance shrinks
with eta (its bias is O(eta tau)) while FedAvg stays near the tau-weighted point.

    python experiments/reproduce/fednova.py           # 8 clients, dim 5, eta 0.01 and 0.003 (~1 min)
    python experiments/reproduce/fednova.py --full    # 20 clients, dim 10, 3 etas, 3 seeds

Writes fednova_small.png / .json (fednova.* with --full): the distance to x* over the rounds.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_lab as fl
from fedjax_lab.algorithms import fedavg, fednova
from fedjax_lab.data import from_client_lists
from fedjax_lab.reproduce import fill_sizes, finish, output_paths, protocol_parser

CLAIM = ("With heterogeneous local steps tau_i, FedNova converges to the minimizer of sum p_i F_i "
         "while FedAvg keeping partial work converges to a tau-weighted point; on quadratics both "
         "land on their closed-form fixed points (Wang et al., NeurIPS 2020, Sec. 3).")


def problem(seed, clients, dim, max_tau):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clients, dim))
    taus = rng.integers(1, max_tau + 1, clients)
    xs = [np.repeat(c[None].astype(np.float32), t, 0) for c, t in zip(centers, taus)]
    return centers, taus, from_client_lists(xs, [np.zeros(t, int) for t in taus], num_classes=1)


def trajectory(factory, data, eta, rounds, seed):
    """The global x after every round (one jitted scan)."""
    setup = fl.Setup.of(clients_per_round=data.num_clients, epochs=1, batch_size=1,
                        client_lr=eta, drop_stragglers=False)
    alg = factory(fl.models.quadratic(data.x.shape[1]), setup=setup)

    @jax.jit
    def run(state):
        def step(s, r):
            s = alg.round(s, data, jax.random.fold_in(jax.random.key(seed + 1), r))[0]
            return s, alg.global_params(s)["x"]
        return jax.lax.scan(step, state, jnp.arange(rounds))[1]
    return np.asarray(run(alg.init(jax.random.key(seed), data)), np.float64)


def main(argv=None):
    ap = protocol_parser(__doc__)
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--max-tau", type=int, default=None)
    ap.add_argument("--etas", type=float, nargs="+", default=None)
    ap.add_argument("--rounds", type=int, default=None)
    args = fill_sizes(ap.parse_args(argv),
                      small=dict(clients=8, dim=5, max_tau=20, etas=[0.01, 0.003], rounds=600,
                                 seeds=1),
                      full=dict(clients=20, dim=10, max_tau=40, etas=[0.01, 0.003, 0.001],
                                rounds=3000, seeds=3))
    figure, metrics_path = output_paths(args.out, "fednova", args.full)
    t0, numbers, curves, ok = time.time(), {}, {}, True
    print(f"| seed | eta    | |FedNova - x*| | |FedAvg - x*| | FedNova - closed | FedAvg - closed | "
          f"|FedAvg - tau-weighted| |")
    print("|------|--------|" + "----------------|" * 2 + "------------------|" * 2 + "------------------------|")
    for seed in range(args.seeds):
        centers, taus, data = problem(seed, args.clients, args.dim, args.max_tau)
        p = taus / taus.sum()
        point = lambda w: (w[:, None] * centers).sum(0) / w.sum()
        x_opt = point(p)
        for eta in args.etas:
            q = (1 - eta) ** taus
            want = {"fednova": point(p * (1 - q) / taus), "fedavg": point(p * (1 - q))}
            xs = {n: trajectory(f, data, eta, args.rounds, seed)
                  for n, f in (("fednova", fednova), ("fedavg", fedavg))}
            dist = {n: float(np.linalg.norm(x[-1] - x_opt)) for n, x in xs.items()}
            off = {n: float(np.linalg.norm(xs[n][-1] - want[n])) for n in xs}
            tau_point = float(np.linalg.norm(xs["fedavg"][-1] - point(p * taus)))
            tag = f"seed {seed} eta {eta:g}"
            numbers.update({f"{tag} fednova to x*": dist["fednova"],
                            f"{tag} fedavg to x*": dist["fedavg"],
                            f"{tag} fednova to closed form": off["fednova"],
                            f"{tag} fedavg to closed form": off["fedavg"],
                            f"{tag} fedavg to tau-weighted point": tau_point})
            ok &= max(off.values()) < 1e-4 * dist["fedavg"] + 1e-6
            if seed == 0:
                curves[eta] = {n: np.linalg.norm(x - x_opt, axis=1) for n, x in xs.items()}
            print(f"| {seed:4d} | {eta:6g} | {dist['fednova']:14.3e} | {dist['fedavg']:13.3e} | "
                  f"{off['fednova']:16.2e} | {off['fedavg']:15.2e} | {tau_point:22.3e} |", flush=True)
        small, large = min(args.etas), max(args.etas)
        d = lambda e, n: numbers[f"seed {seed} eta {e:g} {n} to x*"]
        ok &= d(small, "fednova") < 0.1 * d(small, "fedavg")
        ok &= len(args.etas) == 1 or d(small, "fednova") < 0.7 * d(large, "fednova")
    print(f"({time.time() - t0:.0f} s)")
    plot(curves, figure)
    print(f"wrote {figure} and {metrics_path}")
    return finish(CLAIM, numbers, bool(ok), metrics_path,
                  extra=dict(rounds=args.rounds, clients=args.clients, dim=args.dim,
                             max_tau=args.max_tau, etas=args.etas, seeds=args.seeds))


def plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for i, (eta, c) in enumerate(sorted(curves.items())):
        for name, style in (("fednova", "-"), ("fedavg", "--")):
            ax.semilogy(np.maximum(c[name], 1e-12), style, color=f"C{i}",
                        label=f"{'FedNova' if name == 'fednova' else 'FedAvg'}, eta {eta:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("||x - argmin sum p_i F_i||")
    ax.set_title("quadratics, heterogeneous local steps tau_i", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
