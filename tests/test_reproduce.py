"""`fedjax-lab reproduce`: discovery, --list, PASS / FAIL, the protocol of every script."""
import ast
import glob
import os
import re

import pytest

from fedjax_lab import reproduce

SCRIPTS = sorted(p for p in glob.glob(os.path.join(reproduce.SCRIPTS_DIR, "*.py"))
                 if not os.path.basename(p).startswith("_"))

PASSING = '''
CLAIM = "x grows with n."
def main(argv=None):
    import argparse
    from fedjax_lab.reproduce import protocol_parser
    p = protocol_parser(__doc__)
    p.add_argument("--n", type=int, default=3)
    args = p.parse_args(argv)
    x = (10 if args.full else 1) * args.n
    return {"claim": CLAIM, "passed": x > 5, "numbers": {"x": float(x)}}
'''


@pytest.fixture
def scripts(tmp_path):
    (tmp_path / "grow.py").write_text(PASSING)
    (tmp_path / "broken.py").write_text('CLAIM = "returns nothing useful."\ndef main(argv=None):\n'
                                        '    return {"claim": CLAIM, "passed": "yes", "numbers": {}}\n')
    (tmp_path / "heavy.py").write_text('CLAIM = "never imported by --list."\nraise RuntimeError("imported")\n')
    (tmp_path / "_helper.py").write_text("X = 1\n")
    return tmp_path


def test_discovers_scripts_and_lists_claims_without_importing(scripts, capsys):
    assert list(reproduce.discover(str(scripts))) == ["broken", "grow", "heavy"]
    assert reproduce.cmd_reproduce(["--list"], directory=str(scripts)) == 0
    out = capsys.readouterr().out
    assert re.search(r"grow +not run +x grows with n\.", out) and re.search(r"heavy +not run +never imported", out)
    (scripts / "later.py").write_text('CLAIM = "added later."\n')      # no list to edit
    reproduce.cmd_reproduce(["--list"], directory=str(scripts))
    assert re.search(r"later +not run +added later\.", capsys.readouterr().out)


def test_pass_and_fail_follow_the_measured_numbers(scripts, capsys):
    assert reproduce.cmd_reproduce(["grow", "--full", "--out", str(scripts / "o")],
                                   directory=str(scripts)) == 0
    out = capsys.readouterr().out
    assert "grow: x grows with n." in out and "x  30" in out and out.rstrip().endswith("grow: PASS")
    assert reproduce.cmd_reproduce(["grow", "--n", "2"], directory=str(scripts)) == 1
    out = capsys.readouterr().out
    assert "x  2" in out and out.rstrip().endswith("grow: FAIL")


def test_bad_scripts_and_names_are_errors(scripts):
    with pytest.raises(SystemExit, match="'passed' must be a bool"):
        reproduce.cmd_reproduce(["broken"], directory=str(scripts))
    with pytest.raises(SystemExit, match="unknown paper 'nope'; valid papers: broken, grow, heavy"):
        reproduce.cmd_reproduce(["nope"], directory=str(scripts))
    (scripts / "noclaim.py").write_text("def main(argv=None):\n    return {}\n")
    with pytest.raises(SystemExit, match="does not follow the protocol"):
        reproduce.cmd_reproduce(["noclaim"], directory=str(scripts))
    with pytest.raises(ValueError, match=r"numbers\['a'\] must be a float"):
        reproduce.check_result("p", {"claim": "c", "passed": True, "numbers": {"a": "1"}})


def test_list_shows_the_last_recorded_outcome(scripts, capsys):
    figures = scripts / "figures"
    figures.mkdir()
    reproduce.finish("x grows with n.", {"x": 3.0}, False, str(figures / "grow_small.json"))
    reproduce.finish("x grows with n.", {"x": 30.0}, True, str(figures / "grow.json"))
    reproduce.cmd_reproduce(["--list"], directory=str(scripts))
    assert re.search(r"grow +PASS \(full\)", capsys.readouterr().out)
    os.remove(figures / "grow.json")
    assert reproduce.last_result("grow", str(figures)) == "FAIL (small)"


def test_output_paths_keep_the_full_figure(tmp_path):
    assert reproduce.output_paths(str(tmp_path), "ditto", False) == (
        str(tmp_path / "ditto_small.png"), str(tmp_path / "ditto_small.json"))
    assert reproduce.output_paths(str(tmp_path), "ditto", True)[0] == str(tmp_path / "ditto.png")


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_every_script_follows_the_protocol(path):
    """A CLAIM sentence and main(argv=None) parsing the shared flags (read, not run: running is
    `make reproduce`-sized; the slow test below runs one)."""
    source = open(path).read()
    tree = ast.parse(source)
    claim = reproduce.read_claim(path)
    assert isinstance(claim, str) and len(claim.strip()) > 30
    mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert mains and [a.arg for a in mains[0].args.args] == ["argv"]
    assert mains[0].args.defaults and getattr(mains[0].args.defaults[0], "value", 0) is None
    assert "protocol_parser(" in source or all(f'"{flag}"' in source for flag in ("--full", "--out", "--seeds"))


@pytest.mark.slow
def test_a_real_script_passes_and_fails_on_its_numbers(tmp_path, capsys):
    """robust.py: at 30 rounds the median survives 20% sign-flippers (PASS); after 1 round it has not
    learned yet (FAIL): `passed` follows the measurement."""
    base = ["robust", "--aggregators", "mean", "median", "--fractions", "0.2", "--out", str(tmp_path)]
    assert reproduce.cmd_reproduce(base) == 0
    out = capsys.readouterr().out
    assert "sign_flip 20% median" in out and "robust: PASS" in out
    assert reproduce.cmd_reproduce(base + ["--rounds", "1"]) == 1
    assert "robust: FAIL" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "robust_small.json")


def test_scripts_listed_by_the_real_runner(capsys):
    assert reproduce.cmd_reproduce(["--list"]) == 0
    out = capsys.readouterr().out
    for path in SCRIPTS:
        assert os.path.basename(path)[:-3] in out
    assert {"bridging", "robust", "ditto", "fetchsgd", "perfedavg"} <= set(reproduce.discover())


def test_parser_defaults():
    args = reproduce.protocol_parser("doc").parse_args([])
    assert (args.full, args.seeds, args.out) == (False, None, reproduce.FIGURES_DIR)
