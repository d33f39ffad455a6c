"""Dataset statistics: `fedjax-lab data SPEC` prints clients, client sizes and label skew, and
writes a client-size plot and a label-distribution heat map.

Label skew is reported three ways, each over clients with at least one example:
  classes_per_client  how many classes a client holds (mean / min / max);
  label_tv            total-variation distance 1/2 sum_c |p_k(c) - p(c)| between a client's label
                      distribution and the global one, averaged over clients (0 = iid, -> 1 = disjoint);
  dominant_fraction   mean share of a client's most frequent class.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np


def _owner_labels(data):
    owner = np.repeat(np.arange(data.num_clients), np.asarray(data.client_sizes))
    return owner, np.asarray(data.y).astype(np.int64)


def _num_classes(data, y):
    return max(int(data.num_classes), int(y.max()) + 1 if y.size else 1)


def label_counts(data, clients=None, classes=None) -> np.ndarray:
    """[num_clients, num_classes] example counts per client and class (host side); `clients` /
    `classes` select rows / columns (a dense table of every client and class can be huge, e.g.
    Stack Overflow's 342k clients x 10k words)."""
    owner, y = _owner_labels(data)
    k = _num_classes(data, y)
    clients = np.arange(data.num_clients) if clients is None else np.asarray(clients)
    classes = np.arange(k) if classes is None else np.asarray(classes)
    row = np.full(data.num_clients, -1)
    row[clients] = np.arange(len(clients))
    col = np.full(k, -1)
    col[classes] = np.arange(len(classes))
    keep = (row[owner] >= 0) & (col[y] >= 0)
    flat = row[owner[keep]] * len(classes) + col[y[keep]]
    return np.bincount(flat, minlength=len(clients) * len(classes)).reshape(len(clients),
                                                                              len(classes))


def _size_stats(sizes):
    sizes = np.asarray(sizes)
    return {"min": int(sizes.min()), "median": float(np.median(sizes)), "mean": float(sizes.mean()),
            "max": int(sizes.max()), "total": int(sizes.sum())}


def describe(data) -> dict:
    """Summary of a FederatedArrays: clients, sizes, feature shape, label skew.

    Works from the (client, class) pairs that occur, never a dense clients x classes table."""
    owner, y = _owner_labels(data)
    k = _num_classes(data, y)
    pairs, n_kc = np.unique(owner * k + y, return_counts=True)
    pk, pc = pairs // k, pairs % k
    sizes = np.bincount(owner, minlength=data.num_clients)
    has = sizes > 0
    glob = np.bincount(y, minlength=k) / max(y.size, 1)
    p_kc = n_kc / sizes[pk]
    present = np.bincount(pk, minlength=data.num_clients)[has]
    # sum_c |p_kc - g_c| = sum over present c of (|p_kc - g_c| - g_c) + 1 (absent c add g_c)
    l1 = np.bincount(pk, weights=np.abs(p_kc - glob[pc]) - glob[pc], minlength=data.num_clients) + 1
    dominant = np.zeros(data.num_clients)
    np.maximum.at(dominant, pk, p_kc)
    out = {
        "num_clients": int(data.num_clients),
        "num_classes": int(data.num_classes),
        "num_examples": int(data.num_examples),
        "feature_shape": list(data.x.shape[1:]),
        "feature_dtype": str(data.x.dtype),
        "client_size": _size_stats(sizes),
        "empty_clients": int((~has).sum()),
        "classes_per_client": {"mean": float(present.mean()), "min": int(present.min()),
                               "max": int(present.max())},
        "label_tv": float(0.5 * l1[has].mean()),
        "dominant_fraction": float(dominant[has].mean()),
        "global_label_counts": np.bincount(y, minlength=k).astype(int).tolist(),
    }
    if data.test is not None:
        tsizes = np.asarray(data.test.client_sizes)
        out["test_client_size"] = _size_stats(tsizes)
        out["test_examples"] = int(tsizes.sum())
        out["clients_without_test"] = int((tsizes == 0).sum())
    return out


def format_description(d: dict, title: str = "") -> str:
    cs = d["client_size"]
    lines = [f"dataset            {title}".rstrip(),
             f"clients            {d['num_clients']}",
             f"examples           {d['num_examples']} train"
             + (f", {d['test_examples']} test" if "test_examples" in d else ""),
             f"features           {d['feature_shape']} {d['feature_dtype']}, "
             f"{d['num_classes']} classes",
             f"client size        min {cs['min']}, median {cs['median']:g}, mean {cs['mean']:.1f}, "
             f"max {cs['max']}"]
    if "test_client_size" in d:
        ts = d["test_client_size"]
        lines.append(f"test client size   min {ts['min']}, median {ts['median']:g}, max {ts['max']} "
                     f"({d['clients_without_test']} clients without test examples)")
    cpc = d["classes_per_client"]
    lines += [f"classes per client mean {cpc['mean']:.2f}, min {cpc['min']}, max {cpc['max']}",
              f"label skew         TV to global {d['label_tv']:.3f}, dominant class share "
              f"{d['dominant_fraction']:.3f}"]
    return "\n".join(lines)


def plot(data, out_dir, *, max_clients: int = 200, max_classes: int = 100,
         prefix: str = "") -> list:
    """Write `client_sizes.png` (sorted client sizes) and `label_heatmap.png` (per-client label
    distribution of the `max_clients` largest clients over at most `max_classes` most frequent
    classes) into out_dir; return their paths."""
    from matplotlib.figure import Figure
    os.makedirs(out_dir, exist_ok=True)
    sizes = np.asarray(data.client_sizes)
    order = np.argsort(-sizes, kind="stable")
    paths = []

    fig = Figure(figsize=(7, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(np.arange(len(sizes)), sizes[order], width=1.0, color="tab:blue")
    ax.set_xlabel("client (sorted by size)")
    ax.set_ylabel("training examples")
    ax.set_title(f"{data.num_clients} clients: min {sizes.min()}, median {np.median(sizes):g}, "
                 f"max {sizes.max()}")
    if sizes.max() > 20 * max(np.median(sizes), 1):
        ax.set_yscale("log")
    paths.append(os.path.join(out_dir, f"{prefix}client_sizes.png"))
    fig.savefig(paths[-1], dpi=120)

    shown = order[:max_clients]
    y = np.asarray(data.y)
    classes = np.arange(_num_classes(data, y))
    if len(classes) > max_classes:       # e.g. a 10k-word vocabulary: the most frequent classes
        classes = np.sort(np.argsort(-np.bincount(y, minlength=len(classes)),
                                     kind="stable")[:max_classes])
    frac = label_counts(data, shown, classes) / np.maximum(sizes[shown, None], 1)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(frac.T, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel(f"client ({len(shown)} largest)" if len(shown) < len(sizes) else "client")
    ax.set_ylabel("class" if len(classes) == data.num_classes else
                  f"class ({len(classes)} most frequent)")
    ax.set_title("label distribution per client")
    fig.colorbar(im, ax=ax, label="fraction of client's examples")
    paths.append(os.path.join(out_dir, f"{prefix}label_heatmap.png"))
    fig.savefig(paths[-1], dpi=120)
    return paths


def main(argv=None) -> int:
    """`fedjax-lab data SPEC [--out DIR] [--seed N]`."""
    from fedjax_lab.data.spec import LOADERS, load
    parser = argparse.ArgumentParser(
        prog="fedjax-lab data", description="Print statistics of a federated dataset and plot its "
        "client sizes and label distribution.",
        epilog="datasets: " + ", ".join(sorted(LOADERS)))
    parser.add_argument("spec", help="dataset spec, e.g. digits:dirichlet=0.3,clients=20")
    parser.add_argument("--out", default=os.path.join("runs", "data"),
                        help="folder for the plots (default: runs/data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    args = parser.parse_args(argv)
    try:
        data = load(args.spec, seed=args.seed)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"fedjax-lab data: {e}", file=sys.stderr)
        return 2
    d = describe(data)
    if args.json:
        import json
        print(json.dumps(d, indent=1))
    else:
        print(format_description(d, args.spec))
    prefix = re.sub(r"[^A-Za-z0-9_.=-]+", "_", args.spec.split(":")[0]) + "_"
    for path in plot(data, args.out, prefix=prefix):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
