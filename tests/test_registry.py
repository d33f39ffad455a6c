"""fedjax_lab.register: an algorithm written in a user's own file, with only the public surface
(fedjax_lab and fedjax_lab.extend), runs through `fedjax-lab run --plugin FILE`."""
import json
import textwrap

import pytest

import fedjax_lab as fl
from fedjax_lab import cli
from fedjax_lab.registry import ALGORITHMS

USER_FILE = '''
import fedjax_lab as fl
from fedjax_lab.extend import Setup, defaults, server_averaging, tree_scale, validate


@defaults(Setup())
def shrunk_fedavg(model, *, shrink: float = 0.5, setup: Setup = Setup()):
    """FedAvg whose server step is shrink * Delta."""
    validate.positive("shrink", shrink)
    return server_averaging(model, setup, shrunk_fedavg,
                            server_rule=lambda ex, extra, n: (tree_scale(ex.direction, shrink), extra))


fl.register("shrunk_fedavg", shrunk_fedavg)
'''


def test_a_users_file_runs_through_the_cli(tmp_path):
    path = tmp_path / "my_alg.py"
    path.write_text(textwrap.dedent(USER_FILE))
    before = dict(ALGORITHMS)
    try:
        out = tmp_path / "run"
        cli.main(["run", "shrunk_fedavg", "--plugin", str(path), "--dataset",
                  "synthetic:1,1,clients=8,dim=10,classes=3", "--rounds", "2", "--eval-every", "2",
                  "--shrink", "0.25", "--clients-per-round", "4", "--local-steps", "2",
                  "--out", str(out), "--no-progress"])
        config = json.loads((out / "config.json").read_text())
        assert config["algorithm"] == "shrunk_fedavg" and config["shrink"] == 0.25
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert history[-1]["round"] == 2 and history[-1]["train_loss"] > 0
        with pytest.raises(ValueError, match="shrink must be > 0"):
            ALGORITHMS["shrunk_fedavg"][0](fl.models.logistic(3), shrink=0.0)
    finally:
        ALGORITHMS.clear()
        ALGORITHMS.update(before)


def test_register_refuses_bad_names_and_silent_replacement():
    with pytest.raises(ValueError, match="name must be a lower-case identifier"):
        fl.register("My Alg", fl.algorithms.fedavg)
    with pytest.raises(ValueError, match="'fedavg' is registered already"):
        fl.register("fedavg", fl.algorithms.fedprox)
    with pytest.raises(ValueError, match="factory must be callable"):
        fl.register("x", 3)
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["list", "--plugin", "/nonexistent/alg.py"])


def test_algorithm_files_import_only_the_public_surface():
    """Every built-in algorithm is written as a user's would be: no import of fedjax_lab.core (its
    writers' surface is fedjax_lab.extend), so a missing hook shows up as a missing export."""
    import ast
    import glob
    import os
    offenders = []
    for path in glob.glob(os.path.join(os.path.dirname(fl.__file__), "algorithms", "*.py")):
        for node in ast.walk(ast.parse(open(path).read())):
            mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{os.path.basename(path)}:{node.lineno} {m}" for m in mods
                          if m == "fedjax_lab.core" or m.startswith("fedjax_lab.core.")]
    assert not offenders, offenders
