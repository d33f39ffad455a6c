"""# How to add an algorithm

A new algorithm is one file that imports `fedjax_lab` and `fedjax_lab.extend` (the writers'
surface) and nothing else of the library. It states its paper's part as hooks of the round
skeleton; the skeleton does the rest. SCAFFOLD (Karimireddy et al., ICML 2020),
`fedjax_lab/algorithms/scaffold.py`, is the worked example of this page and of
`notebooks/write_your_own_algorithm.ipynb`.

## 1. Find the shape of your algorithm

Every algorithm is an `fedjax_lab.Algorithm`: a frozen record of pure functions,

    state = alg.init(key, data)                   # server state + stacked per-client rows [N, ...]
    state, metrics = alg.round(state, data, key)  # pure, jittable: sample, train, aggregate
    params = alg.client_params(state, ids)        # what clients `ids` deploy, stacked

The round skeleton (`fedjax_lab.extend.ServerRound`) is

    sample -> batches -> clients (vmapped local training) -> message -> uplink -> attack
           -> aggregate -> server rule -> server optimizer -> metrics, bytes

and an algorithm changes it through hooks, each optional (`fedjax_lab.extend` lists them):

| hook | what it is | who uses it |
|---|---|---|
| `objective(w, w_t)` | a term of the local objective | FedProx's mu/2 ||w - w_t||^2 |
| `local_objective(w, ctx)` | the same with the client's context ctx = (w_t, row, extra) | SCAFFOLD's <c - c_i, y>, FedDyn |
| `batch_objective(w, xb, yb, rng, ctx)` | a term of each step's batch | MOON's contrastive loss |
| `message(res, ctx)` | what the client sends (default w_k - w_t) | FedNova's normalized update, q-FFL |
| `init_row`, `new_row(res, ctx)` | a row of state for every client | SCAFFOLD's c_i, FedDyn, MOON, FedBN |
| `start(w_t, row)` | where a client starts and what it deploys (personalized) | FedBN's own BatchNorm layers |
| `init_extra`, `server_rule(ex, extra, N)` | extra server state; the direction the server optimizer takes | SCAFFOLD's c, FedDyn's h |
| `send_extra`, `up_bytes`, `down_bytes` | what travels, for the byte accounting | SCAFFOLD sends c down |

The skeleton reports `local_loss`, `local_objective`, `clients_aggregated` and the `bytes_*`
metrics, pads the cohort for a client mesh, keeps rows on device or in the host store, and
composes with every aggregator, attack, uplink and server optimizer of the `Setup`. If your
round cannot be written with these hooks, build it from the same pieces (`begin_round(key,
data, setup)` -> (participation, data as the attack poisons it, the round's other keys),
`local_train`, `client_weights`, `server_update`, `RowRound` + `row_algorithm` with
`round_ids` as its sampler) and tell us which hook was missing.

## 2. Write the factory

    from fedjax_lab.extend import (Cohort, Optimizer, Setup, defaults, resolve, server_averaging,
                                   tree_add, tree_scale, tree_sub, tree_vdot, tree_zeros_like)

    # abridged from fedjax_lab/algorithms/scaffold.py (which also guards K = 0 and offers option I)
    @defaults(Setup(cohort=Cohort(weighting="uniform")))
    def scaffold(model, *, option: str = "II", setup: Setup = Setup()):
        \"\"\"SCAFFOLD (Karimireddy et al., ICML 2020), Algorithm 1:
            y <- y - eta_l (g_i(y) - c_i + c),  c_i+ = c_i - c + (x - y_i) / (K eta_l)  (option II)
            x <- x + eta_g mean(Delta y),       c <- c + |S|/N mean(Delta c)\"\"\"
        s = resolve(setup, scaffold)
        eta_l = s.client_opt.lr
        c_plus = lambda res, ctx: jax.tree.map(
            lambda c_i, c, x, y: c_i - c + (x - y) / (res.num_steps * eta_l),
            ctx.row, ctx.extra, ctx.w_t, res.params)
        return server_averaging(
            model, s, scaffold,
            local_objective=lambda y, ctx: tree_vdot(tree_sub(ctx.extra, ctx.row), y),
            message=lambda res, ctx: (tree_sub(res.params, ctx.w_t), tree_sub(c_plus(res, ctx), ctx.row)),
            init_row=tree_zeros_like, new_row=c_plus, init_extra=tree_zeros_like, send_extra=True,
            server_rule=lambda ex, c, N: (ex.direction[0], tree_add(
                c, tree_scale(ex.direction[1], jnp.sum(ex.weights > 0) / N))))

* The signature is `def algo(model, *, <paper hyperparameters by keyword>, setup: Setup = Setup())`:
  the paper's names; the shared plumbing (cohort, local work, optimizers, aggregator, attack,
  uplink) is the `Setup`, never re-listed. `defaults(setup, uses=..., model=...)` attaches the
  algorithm's default Setup, the Setup fields it uses (`resolve` refuses the others, naming them)
  and the model its mechanism needs when the user names none.
* `defaults` records the call: the returned algorithm gets its name (the factory's) and its
  `alg.config` (config.json, checkpoints, resume): the name, the model, the fields of the resolved
  `alg.setup` it uses, and each of the factory's own bool / int / float / str arguments, bound
  from its signature with the defaults applied, so the file lists no hyperparameter twice and
  writes no config. A model or other
  object the algorithm takes is its own to describe: what the factory returns in `alg.config`
  (say `config=dict(derived=dict(server_model=...))`) is kept, and `derived` is what no flag sets.
* Validate at once, before anything compiles: a `ValueError` naming the argument and the expected
  value (`fedjax_lab.extend.validate`). SCAFFOLD's option II divides by `K eta_l`, so it refuses
  a client optimizer other than plain SGD.
* The docstring carries the paper's equations with the paper's symbols; where the paper and its
  official code differ, offer both as a named option and state the default.
* Inside the hooks: no Python loop over clients (they run vmapped), no host round-trips, no
  Python branch on a traced value (variable work is the step mask).

## 3. Register it

From anywhere, your own file included:

    import fedjax_lab as fl
    fl.register("scaffold", scaffold)

The CLI derives the flags from the factory's keyword parameters and its Setup fields. Your file
is loaded with `--plugin` (or `$FEDJAX_LAB_PLUGINS`; an installed package declares an entry point
in the group `fedjax_lab.algorithms`):

    fedjax-lab run scaffold --plugin my_scaffold.py --client-lr 0.05 --local-steps 20 --out runs/s
    fedjax-lab list --plugin my_scaffold.py

Inside the package, an algorithm is registered in `fedjax_lab/algorithms/__init__.py`.

## 4. Prove it

* **The conformance suite** (`tests/test_conformance.py`) checks every registered name: one round
  equal to its reference, determinism, checkpoint and resume, config.json re-run, vmap over each
  traced float hyperparameter, bad input, bytes in the metrics. Your part is the reference: a
  file `tests/references/<name>.py` with `REFERENCE = {"name": fn}`, the paper's rule written out
  client by client in plain numpy (contract in `tests/references/__init__.py`).
* **A per-client reference loop over several rounds** where the algorithm has state (rows,
  extra), with stragglers (`tests/test_scaffold.py`).
* **A learning test against the ablation** of the paper's mechanism, with fixed seeds, asserting
  on numbers: SCAFFOLD with `control_variates=False` is FedAvg bit for bit; with its variates on,
  two digit classes per client and 20 local steps, its train loss is clearly below FedAvg's.
* **Bad input**: each refusal raises `ValueError` naming the argument.
* Keep default tests to seconds; mark heavier ones `@pytest.mark.slow`.

## 5. Reproduce the claim

Add `experiments/reproduce/PAPER.py` with `CLAIM = "..."` and `main(argv=None) -> dict` (parsing
`--full`, `--out`, `--seeds` with `fedjax_lab.reproduce.protocol_parser`, returning
`fedjax_lab.reproduce.finish(CLAIM, numbers, passed, ...)` with `passed` computed from the measured
numbers). `fedjax-lab reproduce PAPER` finds it with no list to edit and prints the claim, the
numbers and PASS / FAIL; `fedjax-lab reproduce --list` shows every claim.
"""
