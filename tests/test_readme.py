"""The README's library example runs as written (with fewer rounds and a temporary directory)."""
import os


def test_readme_library_example_runs(tmp_path):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    start = readme.index("```python\nimport jax, fedjax_lab as fl")
    code = readme[start + len("```python\n"):readme.index("```", start + 10)]
    for old, new in [("rounds=200", "rounds=4"), ("eval_every=10", "eval_every=2"),
                     ('out="runs/x", checkpoint_every=50', f'out="{tmp_path}", checkpoint_every=2')]:
        assert old in code, old
        code = code.replace(old, new)
    env = {}
    exec(compile(code, "README.md", "exec"), env)
    assert env["result"].history[-1]["round"] == 4
    assert env["robust"].config["aggregator"] == "trimmed_mean"
    assert env["grid"]["Dense_0"]["kernel"].shape[0] == 3
