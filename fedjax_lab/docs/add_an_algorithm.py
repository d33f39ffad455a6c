"""# How to add an algorithm

This page follows `notebooks/write_your_own_algorithm.ipynb`, which adds SCAFFOLD (Karimireddy et
al., ICML 2020) in about 30 lines and checks it against a per-client reference loop. The rules it
follows hold for every algorithm of the library.

## 1. Find the shape of your algorithm

Every algorithm is an `fedjax_lab.core.types.Algorithm`: a frozen record of pure functions,

    state = alg.init(key, data)                   # server state + stacked per-client rows [N, ...]
    state, metrics = alg.round(state, data, key)  # pure, jittable: sample, train, aggregate
    params = alg.client_params(state, ids)        # what clients `ids` deploy, stacked

There are three ways to build one, from the least to the most code:

* **The round skeleton** (`fedjax_lab.core.skeleton.ServerRound`): sample, draw batches, map the
  clients, message, uplink, attack, aggregate, server step. If your paper changes only the local
  objective (FedProx's `mu/2 ||w - w_t||^2`), the message (a gradient instead of `w_k - w_t`), the
  uplink or the aggregator, you write that one piece: `fedjax_lab.algorithms.fedprox` is a
  `proximal_term` handed to `fedjax_lab.algorithms.fedavg.server_averaging`. Your algorithm then
  composes with every aggregator, attack, uplink and server optimizer for free.
* **Per-client rows** (`fedjax_lab.core.client_state.RowRound` and `row_algorithm`): when each client
  keeps state across rounds (Ditto's personal models, SCAFFOLD's control variates c_i), you write
  the round over the *sampled rows only*; gathering `rows[ids]` and scattering them back happens
  inside the jitted round, and the same round runs with the rows in a host store
  (`fedjax_lab.core.store`) for millions of clients.
* **A round of your own**, from the same pieces: `fedjax_lab.core.rounds.participate` (the round's
  clients, their batches drawn on device and the stragglers' step mask),
  `fedjax_lab.core.local.local_train` (one client's `lax.scan` of local steps, with `extra_loss`
  for your term and `anchor` for a per-client argument), `fedjax_lab.core.rounds.client_weights`,
  `fedjax_lab.core.tree.tree_weighted_mean` and `fedjax_lab.core.rounds.server_update`.

SCAFFOLD takes the second way: its local step `y <- y - eta_l (g_i(y) - c_i + c)` is `local_train`
with `extra_loss(y, correction) = <c - c_i, y>` (gradient `c - c_i`, the correction passed per client
as the `anchor`), its rows are the c_i, and the server state holds x and c.

## 2. Write the factory

    SCAFFOLD = Setup(cohort=Cohort(weighting="uniform"), client_opt=Optimizer("sgd", lr=0.01),
                     server_opt=Optimizer("sgd", lr=1.0))

    @defaults(SCAFFOLD, uses={"cohort", "work", "client_opt", "server_opt"})
    def scaffold(model, *, setup: Setup = Setup()):
        \"\"\"SCAFFOLD (Karimireddy et al., ICML 2020), Algorithm 1 with option II: ...equations...\"\"\"
        s = resolve(setup, scaffold)
        ...                                  # validate, then build the round from the pieces
        return dataclasses.replace(row_algorithm(spec, name="scaffold", ...), setup=s)

* The signature is `def algo(model, *, <paper hyperparameters by keyword>, setup: Setup = Setup())`.
  The hyperparameters are the paper's, with the paper's names; the shared plumbing (clients per
  round, local steps, batch size, optimizers, aggregator, attack, uplink) is the `Setup`, never
  re-listed. `fedjax_lab.core.setup.defaults` attaches the algorithm's defaults and the Setup fields
  it uses (`resolve` then refuses the others with a message naming them).
* Validate at once, before anything compiles: a `ValueError` naming the argument and the expected
  value (`fedjax_lab.core.validate`); data-dependent checks go in the record's `check(data)`.
  SCAFFOLD's option II divides by `K eta_l`, so it refuses a client optimizer other than plain SGD.
* The docstring carries the paper's equations with the paper's symbols. Where the paper and its
  official code differ, offer both as a named option and state the default.
* Inside the round: no Python loop over clients (vmap), no host round-trips, no Python branch on a
  traced value (variable work is the step mask).
* `fedjax_lab.core.setup.algorithm_config` records the factory call for `config.json` and checkpoints.

## 3. Register it

One line in `fedjax_lab/algorithms/__init__.py`:

    "scaffold": (scaffold, "SCAFFOLD (Karimireddy et al. 2020): control variates correct client drift"),

The CLI derives the flags from the factory's keyword parameters and its Setup fields, so
`fedjax-lab run scaffold --client-lr 0.05 --local-steps 20 --out runs/scaffold` and `fedjax-lab list`
work with nothing else to edit; `fedjax-lab plot runs/scaffold --out fig.png` draws the run.

## 4. Prove it

* **A per-client reference loop**: the paper's rule written out client by client in plain numpy or
  unjitted JAX (no vmap, none of the code under test's helpers for the maths), same key, same
  numbers to tolerance, over a few rounds and with stragglers (`tests/test_scaffold.py`).
* **A learning test against the ablation** of the paper's mechanism, with fixed seeds, asserting on
  numbers: SCAFFOLD with its control variates switched off is FedAvg, and with two digit classes per
  client and 20 local steps SCAFFOLD's train loss after 30 rounds is clearly below FedAvg's.
* **Bad input**: each refusal raises `ValueError` naming the argument.
* Keep the default tests to seconds; mark heavier ones `@pytest.mark.slow`.

## 5. Reproduce the claim

Add `experiments/reproduce/PAPER.py` with `CLAIM = "..."` and `main(argv=None) -> dict` (parsing
`--full`, `--out`, `--seeds` with `fedjax_lab.reproduce.protocol_parser`, returning
`fedjax_lab.reproduce.finish(CLAIM, numbers, passed, ...)` with `passed` computed from the measured
numbers). `fedjax-lab reproduce PAPER` finds it with no list to edit and prints the claim, the
numbers and PASS / FAIL; `fedjax-lab reproduce --list` shows every claim.
"""
