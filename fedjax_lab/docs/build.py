"""Build the API reference with pdoc: `python -m fedjax_lab.docs.build [OUT]` (default build/api).

Fails (exit status 1, each problem on its own line) when a module of the package does not import,
when pdoc warns while rendering, or when a docstring names a dotted `fedjax_lab.…` object that does
not resolve (a renamed function, a moved module): the reference must not point at nothing.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import os
import pathlib
import pkgutil
import re
import sys
import warnings

PACKAGE = "fedjax_lab"
REFERENCE = re.compile(r"\bfedjax_lab(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def modules(package: str = PACKAGE) -> list:
    """Every module of the package, imported (ImportError propagates with its name)."""
    root = importlib.import_module(package)
    names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")]
    out = []
    for name in names:
        try:
            out.append(importlib.import_module(name))
        except Exception as e:                          # noqa: BLE001 - reported, not hidden
            raise ImportError(f"{name} does not import: {type(e).__name__}: {e}") from e
    return out


def docstrings(module) -> list:
    """(where, docstring) of the module and of every class and function defined in its source."""
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError):
        return []
    out = [(module.__name__, ast.get_docstring(tree) or "")]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append((f"{module.__name__}.{node.name}", ast.get_docstring(node) or ""))
    return out


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def broken_references(mods) -> list:
    problems = []
    for module in mods:
        for where, doc in docstrings(module):
            for ref in sorted(set(REFERENCE.findall(doc))):
                ref = ref.rstrip(".")
                if not resolves(ref):
                    problems.append(f"{where}: docstring names {ref}, which does not exist")
    return problems


def build(out: str = os.path.join("build", "api")) -> list:
    """Render the reference into `out`; returns the problems (empty: a good build)."""
    import pdoc
    import pdoc.render
    try:
        mods = modules()
    except ImportError as e:
        return [str(e)]
    problems = broken_references(mods)
    pdoc.render.configure(docformat="markdown", footer_text="fedjax_lab API reference",
                          search=True, show_source=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _render(pdoc, [m.__name__ for m in mods], pathlib.Path(out))
    # pdoc cannot evaluate some postponed annotations (dataclass fields inherited across modules
    # under `from __future__ import annotations`); it shows them as written, which is no broken link
    problems += [f"pdoc: {w.message}" for w in caught
                 if ("pdoc" in (w.filename or "") or "pdoc" in str(w.category.__module__))
                 and "Error parsing type annotation" not in str(w.message)]
    for page in ("fedjax_lab.html", os.path.join("fedjax_lab", "docs", "add_an_algorithm.html")):
        if not os.path.isfile(os.path.join(out, page)):
            problems.append(f"pdoc wrote no {page} in {out}")
    return problems


def _render(pdoc, names, out: pathlib.Path):
    """pdoc.pdoc for an explicit list of modules: every module of the package gets its page (the
    package's `__all__` lists what `import fedjax_lab` exposes, not what the reference covers)."""
    all_modules = {name: pdoc.doc.Module.from_name(name) for name in names}
    for module in all_modules.values():
        page = out / f"{module.fullname.replace('.', '/')}.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(pdoc.render.html_module(module, all_modules))
    (out / "index.html").write_text(pdoc.render.html_index(all_modules) or "")
    (out / "search.js").write_text(pdoc.render.search_index(all_modules) or "")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = argv[0] if argv else os.path.join("build", "api")
    problems = build(out)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if not problems:
        print(f"wrote the API reference to {os.path.join(out, 'index.html')}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
