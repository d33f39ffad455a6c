"""A PyTorch per-client FedAvg loop, as PFLlib and FedML run a round, on the peers' workload.

Run by experiments/bench_peers.py in the `torch` venv (torch 2.13.0+cpu, experiments/peers/setup.py):
    python experiments/peers/run_torch_loop.py WORKLOAD_DIR --variant tensors|dataloader --threads T

How PFLlib (clientavg.py / serveravg.py) and FedML (their default `ModelTrainerCLS`) run a round:
the server sends the global weights to each sampled client in turn; the client copies them into
its model, iterates over its data (a `torch.utils.data.DataLoader`), and per batch does
`loss = CrossEntropyLoss(model(x), y); optimizer.zero_grad(); loss.backward(); optimizer.step()`;
the server then sums the returned weights scaled by n_k / sum n. Written here as fast as that loop
goes, so the contender is the best of its kind:

* one `nn.Linear(60, 10)` and one `torch.optim.SGD(lr=0.05)` reused by every client (plain SGD has
  no state, so this is the same as a fresh optimizer per client), weights loaded in place
  (`copy_` under `no_grad`), the weighted sum accumulated in place: no deepcopy, no state_dict;
* `--variant tensors` ("pre-sliced"): each round's batches are gathered for all clients in one
  indexing op, `X[idx] -> [C, S, B, 60]`, and step s of client j uses the view `X[j, s]`: the
  only per-step host work is the four framework calls above;
* `--variant dataloader`: each client's examples are a `TensorDataset` built once; per round a
  `DataLoader(dataset, batch_sampler=<the round's batches>)` is built per client and iterated, as
  PFLlib does (num_workers=0, its default); the sampler follows the common schedule so the
  numbers are the same as the tensors variant's;
* `torch.set_num_threads(T)`, T = bench_peers' `--threads` (default: all cores, like XLA).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np   # noqa: E402
import torch         # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import common        # noqa: E402


def run(wl, C, variant):
    X, Y = torch.from_numpy(wl["x"]), torch.from_numpy(wl["y"])
    off = wl["offsets"]
    model = nn.Linear(X.shape[1], 10)
    opt = torch.optim.SGD(model.parameters(), lr=wl["client_lr"])
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        g_w = torch.from_numpy(wl["w0"].T.copy())      # torch keeps W as [out, in]
        g_b = torch.from_numpy(wl["b0"].copy())
    datasets = [TensorDataset(X[off[k]:off[k + 1]], Y[off[k]:off[k + 1]])
                for k in range(len(off) - 1)] if variant == "dataloader" else None
    timer = common.Timer()
    for r in range(wl["rounds"]):
        ids, idx = wl["ids"][C][r], wl["idx"][C][r]
        with timer:
            acc_w, acc_b = torch.zeros_like(g_w), torch.zeros_like(g_b)
            n = (off[ids + 1] - off[ids]).astype(np.float64)
            p = n / n.sum()
            if variant == "tensors":
                t_idx = torch.from_numpy(idx)
                xb_all, yb_all = X[t_idx], Y[t_idx]            # [C, S, B, 60], [C, S, B]
            for j, k in enumerate(ids):
                with torch.no_grad():
                    model.weight.copy_(g_w)
                    model.bias.copy_(g_b)
                if variant == "tensors":
                    batches = zip(xb_all[j], yb_all[j])
                else:
                    batches = DataLoader(datasets[k], batch_sampler=(idx[j] - off[k]).tolist())
                for xb, yb in batches:
                    loss = loss_fn(model(xb), yb)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                with torch.no_grad():
                    acc_w.add_(model.weight, alpha=float(p[j]))
                    acc_b.add_(model.bias, alpha=float(p[j]))
            g_w, g_b = acc_w, acc_b        # server SGD at lr 1 on the mean delta = weighted mean
    return timer, g_w.numpy().T, g_b.numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload")
    ap.add_argument("--variant", choices=["tensors", "dataloader"], default="tensors")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    wl = common.load(args.workload)
    system = "torch_loop" if args.variant == "tensors" else "torch_dataloader"
    for C in wl["cohorts"]:
        timer, w, b = run(wl, C, args.variant)
        common.emit(wl, system=system, version=f"torch {torch.__version__}", C=C, timer=timer,
                    w=w, b=b, threads=args.threads)


if __name__ == "__main__":
    main()
