import jax
import numpy as np
import pytest

from fedjax_lab.data import from_client_lists


@pytest.fixture(scope="session")
def tiny_data():
    """5 clients of unequal sizes (3..17 examples), 4 features, 3 classes, with test splits."""
    rng = np.random.default_rng(0)
    sizes = [3, 8, 17, 5, 11]
    xs = [rng.normal(size=(n, 4)).astype(np.float32) + k for k, n in enumerate(sizes)]
    ys = [rng.integers(0, 3, n) for n in sizes]
    txs = [rng.normal(size=(2, 4)).astype(np.float32) for _ in sizes]
    tys = [rng.integers(0, 3, 2) for _ in sizes]
    return from_client_lists(xs, ys, test_xs=txs, test_ys=tys, num_classes=3)


@pytest.fixture(scope="session")
def synthetic_small():
    from fedjax_lab.data import synthetic
    return synthetic(1.0, 1.0, num_clients=12, seed=3, max_size=120)


def count_compiles():
    """Context manager counting XLA backend compilations."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        events = []

        def listener(event, duration, **kw):
            if event == "/jax/core/compile/backend_compile_duration":
                events.append(event)
        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            yield events
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
    return ctx()
