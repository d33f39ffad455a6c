"""Flower's simulation engine (`flwr.simulation.run_simulation`, Ray backend) on the peers' workload.

Run by experiments/bench_peers.py in the `flower` venv (flwr[simulation], Ray, torch 2.13.0+cpu):
    python experiments/peers/run_flower.py WORKLOAD_DIR --threads T

Built as Flower's PyTorch quickstart builds it with the Message API: a `ServerApp` whose main runs
`flwr.serverapp.strategy.FedAvg(fraction_train=1.0, fraction_evaluate=0.0)` (weights n_k, the
"num-examples" each client reports) for R rounds, and a `ClientApp` whose `train` loads the
`ArrayRecord` into a `Linear(60, 10)`, runs the torch loop of run_torch_loop.py (tensors variant:
20 steps of `zero_grad/backward/step`, lr 0.05) and replies with its weights. Each of the C
virtual SuperNodes (`num_supernodes = C`) is, in round r, client ids[r, j] of the common schedule
(j = its partition-id), so Flower's cohort of all nodes is exactly that round's cohort. Ray runs
the ClientApps in actors, one CPU each (`client_resources={"num_cpus": 1}`: as many actors as
cores, each with `torch.set_num_threads(1)`), so Flower uses the cores the way it is meant to.
Round times are taken between the strategy's `evaluate_fn` calls (it is called before round 1
and after each round); the first round, which includes starting the actors, is left out.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch         # noqa: E402
from torch import nn  # noqa: E402

import common        # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

_CLIENT = {}   # per actor process: the workload and one model + optimizer, built at first use


def _client_state(C):
    if C not in _CLIENT:
        torch.set_num_threads(1)
        wl = common.load(os.environ["PEERS_WORKLOAD"])
        model = nn.Linear(wl["dim"], 10)
        _CLIENT[C] = dict(wl=wl, X=torch.from_numpy(wl["x"]), Y=torch.from_numpy(wl["y"]),
                          idx=torch.from_numpy(wl["idx"][C]), model=model, loss=nn.CrossEntropyLoss(),
                          opt=torch.optim.SGD(model.parameters(), lr=wl["client_lr"]))
    return _CLIENT[C]


def make_client_app(C):
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context):
        s = _client_state(C)
        model, opt, loss_fn = s["model"], s["opt"], s["loss"]
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        r = int(msg.content["config"]["server-round"]) - 1
        j = int(context.node_config["partition-id"])
        rows = s["idx"][r, j]
        for xb, yb in zip(s["X"][rows], s["Y"][rows]):
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        k = int(s["wl"]["ids"][C][r, j])
        n = int(s["wl"]["offsets"][k + 1] - s["wl"]["offsets"][k])
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"num-examples": n})})
        return Message(content=content, reply_to=msg)

    return app


def make_server_app(wl, C, timer, final):
    app = ServerApp()
    stamps = []

    def stamp(server_round, arrays):
        stamps.append(time.perf_counter())
        if len(stamps) > 1:
            timer.ms.append((stamps[-1] - stamps[-2]) * 1e3)
        final["arrays"] = arrays
        return None

    @app.main()
    def main(grid: Grid, context: Context):
        init = nn.Linear(wl["dim"], 10)
        with torch.no_grad():
            init.weight.copy_(torch.from_numpy(wl["w0"].T.copy()))
            init.bias.copy_(torch.from_numpy(wl["b0"]))
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=C,
                          min_available_nodes=C)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(init.state_dict()),
                       num_rounds=wl["rounds"], evaluate_fn=stamp)

    return app


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="Ray CPUs (actors)")
    args = ap.parse_args(argv)
    os.environ["PEERS_WORKLOAD"] = os.path.abspath(args.workload)
    wl = common.load(args.workload)
    version = f"flwr {md.version('flwr')}, ray {md.version('ray')}, torch {torch.__version__}"
    for C in wl["cohorts"]:
        timer, final = common.Timer(), {}
        run_simulation(server_app=make_server_app(wl, C, timer, final),
                       client_app=make_client_app(C), num_supernodes=C,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": args.threads}})
        sd = final["arrays"].to_torch_state_dict()
        common.emit(wl, system="flower", version=version, C=C, timer=timer,
                    w=sd["weight"].numpy().T, b=sd["bias"].numpy(), actors=args.threads)


if __name__ == "__main__":
    main()
