"""The personalization leaderboard: every personalization method with its defaults, on the same
data, splits and seeds, in one call (`fedjax-lab leaderboard`).

    board = fl.leaderboard.leaderboard(datasets=("digits", "mnist1d"),
                                       splits=("shards=2", "dirichlet=0.1"), seeds=(0, 1, 2))
    print(fl.leaderboard.table(board))

Methods: every registered algorithm whose model is personal (`Algorithm.personalized`: Ditto,
FedAMP, pFedHN, FedProto, FedBN, the personalization canon ...) or adapted at evaluation
(`adapt`: FedMeta, Per-FedAvg), plus three baselines: FedAvg's global model, FedAvg + fine-tuning
(every client takes `finetune_steps` SGD steps from the final global model on its own train
split, `core.evaluate.adapted_sums`) and local-only training (Ditto with lam = 0: each client's
personal model never sees another client). Each method runs with its own defaults
(`fedjax-lab run NAME`: its default model and Setup) for `rounds` rounds with `clients_per_round`
clients; nothing is tuned per dataset.

Scored per method, dataset and split (mean +- std over the seeds): the mean over clients of each
client's test accuracy under its own model (personalized, adapted or global, whichever the method
deploys), the 10th percentile over clients (p10), the rounds, the bytes sent up and down in all,
and the wall time (compilation included). The seeds are training seeds (`key`) of one
partition (data seed 0), run as one vmapped program (`fl.sweep`) per method and dataset.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Optional, Sequence

import numpy as np

BASELINES = ("fedavg", "fedavg_ft", "local")


@dataclasses.dataclass
class Entry:
    method: str
    dataset: str
    metric: str            # which accuracy was scored (personal, adapted, global)
    accuracy: list         # per seed: mean over clients
    p10: list              # per seed: 10th percentile over clients
    rounds: int
    bytes_total: float     # per seed mean: bytes up + down over all rounds
    seconds: float         # wall time of the method on this dataset (all seeds)
    error: Optional[str] = None


def personalization_methods(data, registry=None) -> list:
    """The registered names whose default build deploys per-client models, adapts, or
    evaluates clients with models of their own (FedProto)."""
    from fedjax_lab import models
    from fedjax_lab.core.setup import default_model
    from fedjax_lab.registry import ALGORITHMS
    out = []
    for name, (factory, _) in sorted((registry or ALGORITHMS).items()):
        try:
            alg = factory(models.get(default_model(factory), data.num_classes, data.x[:1]))
        except Exception:            # a method that needs more than its defaults is reported apart
            continue
        if (alg.personalized or getattr(alg, "adapt", None) is not None
                or getattr(alg, "evaluate_sums", None) is not None):   # FedProto's own models
            out.append(name)
    return out


def _score(history: dict):
    """(metric name, mean client accuracy, p10) of the model the method deploys."""
    for prefix in ("test_adapted", "test_personal", "test"):
        if f"{prefix}_accuracy_client_mean" in history:
            return (prefix, history[f"{prefix}_accuracy_client_mean"],
                    history[f"{prefix}_accuracy_p10"])
    raise ValueError(f"no per-client test accuracy in {sorted(history)}")


def run_method(name: str, data, *, seeds, rounds: int, clients_per_round: int,
               finetune_steps: int) -> Entry:
    """One method (or baseline) on one dataset over `seeds`."""
    import jax
    from fedjax_lab import Setup, models
    from fedjax_lab.core.evaluate import adapted_sums, summarize
    from fedjax_lab.core.setup import default_model
    from fedjax_lab.core.sweep import sweep
    from fedjax_lab.registry import ALGORITHMS
    start = time.time()
    base = {"fedavg_ft": "fedavg", "local": "ditto"}.get(name, name)
    factory = ALGORITHMS[base][0]
    model = models.get(default_model(factory), data.num_classes, data.x[:1])
    fixed = {"clients_per_round": min(clients_per_round, data.num_clients)}
    if name == "local":
        fixed["lam"] = 0.0
    result = sweep(factory, data, grid={}, seeds=list(seeds), rounds=rounds, eval_every=rounds,
                   fixed=fixed, model=model, progress=False)
    alg = factory(model, setup=Setup.of(clients_per_round=fixed["clients_per_round"]))
    finetuned = jax.jit(lambda params, d, key: adapted_sums(
        model, alg.setup.client_opt.build(), params, d, key, steps=finetune_steps,
        batch_size=alg.setup.work.batch_size))
    acc, p10, total = [], [], []
    for seed, r in zip(seeds, result.runs):
        h = r.history[-1]
        total.append(h.get("total_bytes_up", 0.0) + h.get("total_bytes_down", 0.0))
        if name == "fedavg_ft":
            sums = finetuned(alg.global_params(r.state), data,
                             jax.random.fold_in(jax.random.key(seed), 0xF7))
            h = summarize("test_finetuned", *sums)
            metric, a, q = ("test_finetuned", h["test_finetuned_accuracy_client_mean"],
                            h["test_finetuned_accuracy_p10"])
        else:
            metric, a, q = _score(h)
        acc.append(float(a))
        p10.append(float(q))
    return Entry(name, "", metric, acc, p10, rounds, float(np.mean(total)), time.time() - start)


def leaderboard(*, datasets: Sequence[str] = ("digits", "mnist1d"),
                splits: Sequence[str] = ("shards=2", "dirichlet=0.1"), clients: int = 20,
                seeds: Sequence[int] = (0, 1, 2), rounds: int = 60, clients_per_round: int = 10,
                finetune_steps: int = 20, methods: Optional[Sequence[str]] = None,
                out: Optional[str] = None, progress: bool = True) -> list:
    """Every method on every `dataset:split,clients=N` (module docstring); a list of Entry.
    A method that fails is recorded with its error, not dropped. With `out`, writes
    leaderboard.json, leaderboard.md and leaderboard.png there."""
    from fedjax_lab import data as fl_data
    entries = []
    for dataset in datasets:
        for split in splits:
            spec = f"{dataset}:{split},clients={clients}"
            data = fl_data.load(spec, seed=0)
            names = list(BASELINES) + [m for m in (methods or personalization_methods(data))
                                       if m not in BASELINES]
            for name in names:
                t = time.time()
                try:
                    e = run_method(name, data, seeds=seeds, rounds=rounds,
                                   clients_per_round=clients_per_round,
                                   finetune_steps=finetune_steps)
                except Exception as err:      # the board shows it, the other methods go on
                    e = Entry(name, "", "", [], [], rounds, 0.0, time.time() - t,
                              error=f"{type(err).__name__}: {err}"[:300])
                e.dataset = spec
                entries.append(e)
                if progress:
                    print(_row(e, _reference(entries, spec)), flush=True)
    if out is not None:
        write(entries, out)
    return entries


def _reference(entries, dataset):
    ft = [e for e in entries if e.dataset == dataset and e.method == "fedavg_ft" and e.accuracy]
    return float(np.mean(ft[0].accuracy)) if ft else None


def _row(e: Entry, ft: Optional[float]) -> str:
    if e.error:
        return f"| {e.dataset} | {e.method} | failed: {e.error} | | | | | |"
    m, s = np.mean(e.accuracy), np.std(e.accuracy)
    beats = "" if ft is None or e.method in BASELINES else ("yes" if m > ft else "**no**")
    return (f"| {e.dataset} | {e.method} | {m:.3f} ± {s:.3f} | {np.mean(e.p10):.3f} | "
            f"{e.metric} | {e.rounds} | {e.bytes_total / 1e6:.1f} | {e.seconds:.0f} | {beats} |")


def table(entries) -> str:
    """The board as a markdown table (one row per dataset and method)."""
    head = ("| data | method | accuracy (mean ± std over seeds) | p10 | scored | rounds | MB | "
            "seconds | beats FedAvg + FT |\n|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [_row(e, _reference(entries, e.dataset)) for e in entries])


def write(entries, out: str) -> None:
    import os
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "leaderboard.json"), "w") as f:
        json.dump([dataclasses.asdict(e) for e in entries], f, indent=1)
    with open(os.path.join(out, "leaderboard.md"), "w") as f:
        f.write(table(entries) + "\n")
    figure(entries, os.path.join(out, "leaderboard.png"))


def figure(entries, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sets = sorted({e.dataset for e in entries})
    fig, axes = plt.subplots(1, len(sets), figsize=(4.5 * len(sets), 5), squeeze=False)
    for ax, d in zip(axes[0], sets):
        rows = [e for e in entries if e.dataset == d and e.accuracy]
        rows.sort(key=lambda e: np.mean(e.accuracy))
        ax.barh([e.method for e in rows], [np.mean(e.accuracy) for e in rows],
                xerr=[np.std(e.accuracy) for e in rows],
                color=["tab:gray" if e.method in BASELINES else "tab:blue" for e in rows])
        ax.set_xlim(min([np.mean(e.accuracy) for e in rows] + [1.0]) - 0.05, 1.0)
        ax.set_title(d, fontsize=9)
        ax.set_xlabel("mean client test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
