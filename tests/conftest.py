import os

# The suite compiles ~5,000 small programs and runs most a few times: XLA:CPU's LLVM backend at -O0
# (jax_disable_most_optimizations: the same HLO passes, the same numbers in every test here) saves
# ~20% of the run. Exported, so the CLI and notebook subprocesses compile the same way;
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 turns it off.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


def pytest_configure(config):
    """The default run (not `-m slow`) also compiles with XLA:CPU's older elemental emitters in place
    of its fusion emitters (--xla_cpu_use_fusion_emitters=false, read once, when the CPU backend
    starts): about half the compile time of a small program (the conformance suite's fl.run of
    FedProx 1.46 -> 0.66 s, of pFedHN 2.82 -> 1.20 s), the same operations with other float
    rounding (a few ulp; every golden run passes). Exported to the CLI and notebook
    subprocesses; the slow tier, whose time goes into running, keeps XLA's defaults;
    FEDJAX_LAB_FUSION_EMITTERS=1 keeps them here too."""
    markexpr = getattr(config.option, "markexpr", "") or ""
    if "not slow" not in markexpr or os.environ.get("FEDJAX_LAB_FUSION_EMITTERS") == "1":
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_use_fusion_emitters" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_use_fusion_emitters=false").strip()

from fedjax_lab.core import cache  # noqa: E402

# Local repeated runs load compiled programs from ~/.cache/fedjax_lab/jax; off under CI=true and
# with FEDJAX_LAB_NO_CACHE=1 (fresh-clone timings are measured without it). Before jax compiles.
CACHE_DIR = cache.enable()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fedjax_lab.data import from_client_lists  # noqa: E402


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
    """Context manager counting XLA compilations: one backend-compile event per program, which
    jax 0.10 logs for a program loaded from the persistent compilation cache as well (next to
    its cache-retrieval event, which is therefore not counted: a cache hit counted twice made
    tests/test_hetero.py's one-program check fail on a warm local cache)."""
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


# Kept out of the default run (CI: 2 cores, about 10 minutes) for time, and run by `make test-slow`.
# Each has a cheaper sibling in the default run that covers the same code: another parameter of the
# same reference test, the same mechanism on a smaller case, or the golden run of a close variant.
SLOW_FOR_TIME = {
    "test_fedproto.py::test_two_rounds_equal_per_client_reference[1.0-mean-sample]",  # lam = 0 reference stays
    "test_models.py::test_cnn_gradients_vmapped_over_stacked_clients_equal_stock_flax",
    "test_setup.py::test_vmap_of_fedprox_round_over_mu_and_seeds_equals_the_separate_rounds",  # test_sweep
    "test_perfedavg.py::test_personalized_accuracy_beats_fedavg_on_training_and_new_clients",
    "test_fetchsgd.py::test_fetchsgd_learns_near_uncompressed_and_beats_local_topk_without_error_feedback",
    "test_ditto.py::test_median_under_sign_flip_matches_per_client_loop",
    "test_ditto.py::test_cli_runs_ditto_with_median_and_an_attack",
    "test_cli.py::test_config_file_reruns_a_run_exactly_and_flags_override_it[toml]",  # [json] stays
    "test_fedavg.py::test_learning_synthetic_iid_both_converge",
    "test_bench_round.py::test_bench_setting_record",
    "test_fedamp.py::test_one_round_matches_per_client_loop[exp-all-own-size]",
    "test_fedamp.py::test_one_round_matches_per_client_loop[exp-sampled-own-size]",
    "test_fedamp.py::test_vmap_over_lam_alpha_sigma_equals_the_separate_runs",  # test_sweep traces floats
    "test_fedmeta.py::test_fomaml_personalizes_better_than_fedavg_on_pathological_digits",
    "test_sharding.py::test_padded_fedamp_gives_the_dummy_no_attention",  # padded stateful rows stay
    "test_bench_round.py::test_clients_map_equals_vmap_with_stragglers_and_extra_loss",
    "test_ditto.py::test_personal_steps_with_stragglers_matches_per_client_loop[False]",  # [True] stays
    "test_golden.py::test_golden_run_is_unchanged[fedamp_at_digits]",
    # quickstart and write_your_own_algorithm still run in a kernel; all four stay checked as stored
    "test_notebooks.py::test_notebook_runs_in_a_kernel_at_the_small_size[personalization_tour.ipynb]",
    "test_notebooks.py::test_notebook_runs_in_a_kernel_at_the_small_size[compression_and_robustness.ipynb]",
    # learning tests (the paper's mechanism against its ablation or FedAvg, 5-17 s each): each file
    # keeps its per-client reference loop, and the conformance suite its reference round
    "test_apfl.py::test_personalized_mixture_beats_fedavg_on_two_label_clients",
    "test_fedbabu.py::test_body_aggregation_helps_the_global_model_and_fine_tuning_personalizes",
    "test_fedamp.py::test_message_passing_beats_local_training_on_clustered_clients",
    "test_fedavg.py::test_learning_fedprox_beats_fedavg_with_90pct_stragglers",  # and `make demo`
    "test_moon.py::test_local_training_lowers_the_contrastive_loss",
    "test_fedbn.py::test_local_batch_norm_beats_fedavg_under_feature_shift",
    "test_ifca.py::test_ifca_recovers_planted_groups_and_beats_one_global_model",
    "test_fedrep.py::test_fedrep_beats_fedavg_on_two_label_clients",
    "test_pfedme.py::test_personalized_models_beat_fedavg_on_two_label_clients",
    # the CLI's CNN still runs in test_cli_runs_fedavg_with_the_cnn_on_mock_mnist
    "test_cnn_end_to_end.py::test_cli_fedavg_cnn_learns_real_digits",
} | {f"test_golden.py::test_golden_run_is_unchanged[{name}]" for name in (
    "fedadagrad", "fedavgm", "fedyogi", "fedopt", "heurfedamp", "noisy_mediansgd", "noisy_signsgd",
    "perfedavg_hf", "fedmeta_fomaml", "fedmeta_metasgd")}


@pytest.fixture(autouse=True)
def _optimized_compile(request):
    """@pytest.mark.optimized, and every slow test: its programs compile with XLA's full
    optimization (a test whose time goes into running, not compiling: 5 s instead of 69 s for the
    digits CNN's learning test, 521 s at -O0 for the slow CNN comparison with FedSGD)."""
    node = request.node
    if node.get_closest_marker("optimized") is None and node.get_closest_marker("slow") is None:
        yield
        return
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


def _run_order(item) -> tuple:
    """tests/test_conformance.py runs algorithm by algorithm (its checks share that algorithm's runs,
    cached per worker), the other files in collection order; under `--dist worksteal` (make test)
    each worker starts on a contiguous half, so a file's (an algorithm's) shared work is mostly
    built once."""
    file = item.nodeid.split("::")[0]
    if file.endswith("test_conformance.py") and hasattr(item, "callspec"):
        return (file, item.callspec.params.get("name", ""))
    return (file, "")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("/")[-1] in SLOW_FOR_TIME:
            item.add_marker(pytest.mark.slow)
    first = {}
    for i, item in enumerate(items):
        first.setdefault(_run_order(item), i)
    items.sort(key=lambda item: first[_run_order(item)])     # stable: collection order within a key
