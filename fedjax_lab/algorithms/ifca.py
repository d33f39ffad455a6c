"""IFCA (Ghosh, Chung, Yin, Ramchandran, "An Efficient Framework for Clustered Federated
Learning", NeurIPS 2020, Algorithm 2 with model averaging, option II).

The server keeps k cluster models theta_1..theta_k (its state: the params stacked [k, ...]; theta_j
initialized from its own key, theta_1 from the run's init key). Round t, sampled client i:

    j^_i = argmin_j F_i(theta_j)              its cluster estimate (all k models go down)
    theta~_i <- local SGD on F_i from theta_{j^_i}
    server:  theta_j <- theta_j + sum_{i: j^_i = j} p_i (theta~_i - theta_j) / sum_{i: j^_i = j} p_i
             (the setup's server optimizer, SGD lr 1: the average within the cluster; a cluster
             no client chose keeps its model)

F_i(theta_j) is estimated on the batches the client draws this round (eval mode, its real steps:
mean_loss), the same data it then trains on. The client uploads its update and its cluster id;
its row is its last cluster estimate j^_i (0 before its first round), and it deploys
theta_{j^_i} (client_params, personalized). There is no single global model.

The round is the skeleton's: each client starts from its cluster's model (w_start) and sends its
update in the row of its cluster, m_i = e_{j^_i} (x) (theta~_i - theta_{j^_i}), with e_{j^_i}; the
aggregate of the m_i divided by that of the e_j is the per-cluster average above (for a linear
aggregator, the mean). `num_clusters=1` is FedAvg bit for bit (the ablation).

Default model: the zoo's mlp (the paper's MNIST experiments train a fully connected network; with
logistic regression and k = 2 on 2-label digits clients, no planted groups, the clusters' models
trail FedAvg's: 0.858 vs 0.867 after 60 rounds; the mlp, 0.911).

Paper vs. code (jichan3751/ifca): the code estimates the cluster on the client's whole train set
and for its MNIST/CIFAR experiments averages within clusters by the number of clients (our
`weighting="uniform"`); the default here weights by n_k, as FedAvg does.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_lab.extend import (ClientBatches, ClientContext, RowRound, ServerRound, Setup,
                               defaults, dense_bytes, init_server, local_train, mean_loss, resolve,
                               row_algorithm, tree_sub, validate)


NO_HYPERGRAD = {"*": "each client's cluster is argmin_j F_i(theta_j), a step without a derivative: "
                     "the registry check measured dL/dclient_lr -6.13 by reverse mode against "
                     "-6.48 +- 0.05 by central differences"}


@defaults(Setup(), model="mlp", no_hypergrad=NO_HYPERGRAD)
def ifca(model, *, num_clusters: int = 2, setup: Setup = Setup()):
    """IFCA (module docstring) with k = num_clusters cluster models."""
    validate.positive("num_clusters", num_clusters, integer=True)
    k = num_clusters
    s = resolve(setup, ifca, drop_stragglers=True)
    train = local_train(model, s.client_opt.build("client_optimizer"))

    def client(start, x, y, idx, step_mask, key):
        w0, onehot = start
        res = train(w0, x, y, idx, step_mask, key)
        delta = tree_sub(res.params, w0)
        in_row = jax.tree.map(lambda d: onehot.reshape((k,) + (1,) * d.ndim) * d[None], delta)
        return (in_row, onehot), res.loss, res.objective

    def per_cluster(ex, extra, num_clients):
        in_rows, share = ex.direction               # sum p_i e_i (x) delta_i / P, sum p_i e_i / P
        scale = jnp.where(share > 0, 1.0 / jnp.where(share > 0, share, 1.0), 0.0)
        return jax.tree.map(lambda d: d * scale.reshape((k,) + (1,) * (d.ndim - 1)).astype(d.dtype),
                            in_rows), extra

    one_model = lambda w_t, data: dense_bytes(jax.tree.map(lambda a: a[0], w_t))
    rnd = ServerRound(model, s, client=client, server_rule=per_cluster, up_bytes=one_model)

    def init_state(key, data):
        rnd.check(data)
        keys = [key] + [jax.random.fold_in(key, j) for j in range(1, k)]
        params = jax.tree.map(lambda *a: jnp.stack(a), *[model.init(kj, data.x[:1]) for kj in keys])
        return init_server(rnd.server_tx, params)

    def step(server, rows, ids, data, key):
        part, rows, data, (k_train,) = rnd.begin_rows(key, data, ids, rows)
        thetas = server.params

        def estimate(idx, mask):
            ctx = ClientContext(None, batches=ClientBatches(data.x, data.y, idx, mask))
            return jnp.argmin(jax.vmap(lambda th: mean_loss(model, th, ctx))(thetas))
        j_hat = jax.vmap(estimate)(part.batches.idx, part.batches.step_mask)
        starts = (jax.tree.map(lambda a: a[j_hat], thetas),
                  jax.nn.one_hot(j_hat, k, dtype=jnp.float32))
        server, metrics = rnd.step_with_exchange(server, data, part, k_train=k_train, key=key,
                                                 w_start=starts)[:2]
        trained = part.batches.num_steps > 0
        new_rows = jnp.where(trained, j_hat.astype(rows.dtype), rows)
        sizes = jnp.sum(jax.nn.one_hot(j_hat, k) * trained[:, None], axis=0)
        metrics.update(largest_cluster_share=jnp.max(sizes) / jnp.maximum(jnp.sum(sizes), 1))
        return server, rnd.end_rows(new_rows, ids), metrics

    spec = RowRound(init_server=init_state, init_row=lambda server: jnp.zeros((), jnp.int32),
                    sample=rnd.sample, step=step,
                    params=lambda server, rows: jax.tree.map(lambda a: a[rows], server.params))
    alg = row_algorithm(spec, model=model, check=rnd.check)
    return dataclasses.replace(alg, setup=s)
