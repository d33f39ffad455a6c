"""The API reference: this package holds its hand-written pages; the rest is the docstrings.

    make docs                             # -> build/api/index.html (build/ is not committed)
    python -m fedjax_lab.docs.build OUT   # the same, into OUT

Pages: `fedjax_lab.docs.add_an_algorithm` (how to add an algorithm, following
notebooks/write_your_own_algorithm.ipynb). The build (`fedjax_lab.docs.build`) fails, and with it CI,
when a module does not import, when pdoc warns, or when a docstring names a `fedjax_lab.…` object
that does not exist.
"""
