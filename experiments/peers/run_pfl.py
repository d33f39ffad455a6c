"""Apple's pfl 0.6 (`pfl.algorithm.FederatedAveraging`, PyTorch backend) on the peers' workload.

Run by experiments/bench_peers.py in the `pfl` venv (pfl[pytorch] 0.6.0 on torch 2.13.0+cpu):
    python experiments/peers/run_pfl.py WORKLOAD_DIR --threads T

Built as pfl's PyTorch benchmarks build FedAvg: an `nn.Module` (a `Linear(60, 10)` with the `loss`
and `metrics` methods pfl requires) wrapped in `pfl.model.pytorch.PyTorchModel` with local
optimizer `torch.optim.SGD(lr=0.05)` and central optimizer `SGD(lr=1.0)`; `FederatedAveraging`
driven by `algorithm.run` on a `SimulatedBackend` with the `WeightByDatapoints` postprocessor
(weights n_k), `NNTrainHyperParams(local_batch_size=10, local_num_epochs=1)`, no evaluation.
pfl simulates users one after another in one process: per user it loads the central weights,
iterates its `Dataset` in consecutive batches (one optimizer step each), and adds the model
difference into the aggregate.

The common schedule: user u = r * C + j of the `FederatedDataset` is client ids[r, j] in round r,
its `Dataset` the 200 rows that client trains on that round, in order (20 consecutive batches of
10); the user sampler returns 0, 1, 2, ... so pfl's cohort r is exactly that round's. One torch
gather per round builds the rows of all its clients (outside pfl, inside the round's time). Round
times are taken between pfl's `after_central_iteration` callbacks (iteration 0 holds warm-up).
`torch.set_num_threads(T)` as for the torch loop.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("PFL_PYTORCH_DEVICE", "cpu")

import torch         # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from pfl.aggregate.simulate import SimulatedBackend            # noqa: E402
from pfl.aggregate.weighting import WeightByDatapoints         # noqa: E402
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams  # noqa: E402
from pfl.callback.base import TrainingProcessCallback              # noqa: E402
from pfl.data.dataset import Dataset                           # noqa: E402
from pfl.data.federated_dataset import FederatedDataset        # noqa: E402
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams  # noqa: E402
from pfl.metrics import Metrics                                # noqa: E402
from pfl.model.pytorch import PyTorchModel                     # noqa: E402

import common        # noqa: E402


class Logistic(nn.Module):
    def __init__(self, dim, num_classes):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.linear(x)

    def loss(self, x, y, eval=False):
        return F.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x, y, eval=False):
        return {}


class RoundTimes(TrainingProcessCallback):
    """Wall time between central iterations (the first from on_train_begin)."""
    def __init__(self, timer):
        self.timer, self.t = timer, None

    def on_train_begin(self, *, model):
        self.t = time.perf_counter()
        return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        now = time.perf_counter()
        self.timer.ms.append((now - self.t) * 1e3)
        self.t = now
        return False, Metrics()


def run(wl, C):
    S, B, R = wl["local_steps"], wl["batch_size"], wl["rounds"]
    X, Y = torch.from_numpy(wl["x"]), torch.from_numpy(wl["y"])
    idx = torch.from_numpy(wl["idx"][C].reshape(R, C, S * B))
    rows = {}

    def make_dataset(u):
        r, j = divmod(u, C)
        if r not in rows:                   # one gather per round, at its first user
            rows.clear()
            rows[r] = (X[idx[r]], Y[idx[r]])
        xr, yr = rows[r]
        return Dataset(raw_data=[xr[j], yr[j]], user_id=str(int(wl["ids"][C][r, j])))

    counter = iter(range(R * C))
    train = FederatedDataset(make_dataset, lambda: next(counter))
    module = Logistic(wl["dim"], 10)
    with torch.no_grad():
        module.linear.weight.copy_(torch.from_numpy(wl["w0"].T.copy()))
        module.linear.bias.copy_(torch.from_numpy(wl["b0"]))
    model = PyTorchModel(model=module,
                         local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(module.parameters(), lr=wl["server_lr"]))
    backend = SimulatedBackend(training_data=train, val_data=None,
                               postprocessors=[WeightByDatapoints()])
    timer = common.Timer()
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=R, evaluation_frequency=R + 1,
                                           train_cohort_size=C, val_cohort_size=None),
        backend=backend, model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=wl["client_lr"],
                                              local_num_epochs=1, local_batch_size=B),
        model_eval_params=NNEvalHyperParams(local_batch_size=B),
        callbacks=[RoundTimes(timer)])
    w = module.linear.weight.detach().numpy().T
    return timer, w, module.linear.bias.detach().numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    wl = common.load(args.workload)
    version = f"pfl {md.version('pfl')}, torch {torch.__version__}"
    for C in wl["cohorts"]:
        timer, w, b = run(wl, C)
        common.emit(wl, system="pfl", version=version, C=C, timer=timer, w=w, b=b,
                    threads=args.threads)


if __name__ == "__main__":
    main()
