"""JAX's persistent compilation cache for local repeated runs (tests, notebooks, scripts).

    from fedjax_lab.core import cache
    cache.enable()        # ~/.cache/fedjax_lab/jax, unless FEDJAX_LAB_NO_CACHE=1 or CI=true

A second run of the same programs loads them from disk instead of compiling (XLA:CPU included).
It is off under CI (the environment variable CI is set to a true value) and whenever
FEDJAX_LAB_NO_CACHE is set to a true value, so fresh-clone and CI timings stay uncached.
FEDJAX_LAB_CACHE_DIR overrides the directory. The cache lives outside the repository.
"""
from __future__ import annotations

import os
from typing import Optional

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "fedjax_lab", "jax")
_TRUE = {"1", "true", "yes", "on"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def disabled() -> bool:
    """True under CI or with FEDJAX_LAB_NO_CACHE set."""
    return _flag("CI") or _flag("FEDJAX_LAB_NO_CACHE")


def enable(path: Optional[str] = None, *, environ: bool = True) -> Optional[str]:
    """Turn the persistent cache on (every compiled program is stored, however fast it compiled);
    returns its directory, or None when disabled(). environ=True also exports JAX_COMPILATION_CACHE_DIR
    and its thresholds, so subprocesses (the CLI, notebook kernels) share the cache."""
    if disabled():
        return None
    import jax
    path = path or os.environ.get("FEDJAX_LAB_CACHE_DIR") or DEFAULT_DIR
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if environ:
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", path)
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    return path
