"""FedGKT (He et al., NeurIPS 2020, Algorithm 1), one round in numpy, client by client and step by
step, with the gkt pair's forward and backward passes by hand (client: conv3 SAME -> ReLU -> mean
over space -> dense; server: conv3 SAME -> ReLU -> flatten -> dense -> ReLU -> dense), for images
[H, W, C] and signals [L]: clients train on CE + alpha KL_T(z_s || z_c) where the server has
answered, upload features, logits and labels of all their examples; the server trains E_s epochs on
CE + KL_T(z_c || z_s) and stores its logits (last epoch's, or a final pass)."""
import jax
import numpy as np

from fedjax_lab.core.rounds import participate


# ---------------------------------------------------------------------------------------------
# The reference: one round, client by client, step by step, in numpy, written from the equations
# with the tiny models' forward and backward passes by hand (client: conv3x3 SAME -> ReLU -> mean
# over space -> dense; server: conv3x3 SAME -> ReLU -> flatten -> dense -> ReLU -> dense).

def im2col(x):
    """[n, H, W, C] -> [n, H*W, 9*C] patches of a 3x3 SAME convolution, ordered (dy, dx, c) as
    flax's kernel [3, 3, C, O].reshape(9*C, O); [n, L, C] (signals) -> [n, L, 3*C], ordered (dx, c)."""
    if x.ndim == 3:
        n, L, C = x.shape
        xp = np.pad(x, ((0, 0), (1, 1), (0, 0)))
        return np.concatenate([xp[:, d:d + L, :] for d in range(3)], axis=-1)
    n, H, W, C = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = [xp[:, dy:dy + H, dx:dx + W, :] for dy in range(3) for dx in range(3)]
    return np.concatenate(cols, axis=-1).reshape(n, H * W, 9 * C)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl(teacher, student, T):
    """T^2 sum_j p_j(teacher / T) (log p_j(teacher / T) - log p_j(student / T)) per example."""
    lt, ls = log_softmax(teacher / T), log_softmax(student / T)
    return T * T * np.sum(np.exp(lt) * (lt - ls), -1)


def loss_and_dz(z, y, teacher, weight, T):
    """Mean over the batch of CE(z, y) + weight_i KL_T(teacher_i || z_i), and its gradient in z:
    d CE / dz = softmax(z) - onehot(y), d KL_T / dz = T (softmax(z / T) - softmax(teacher / T))."""
    n = len(y)
    onehot = np.eye(z.shape[-1])[y]
    ce = -log_softmax(z)[np.arange(n), y]
    value = np.mean(ce + weight * kl(teacher, z, T))
    dz = softmax(z) - onehot + weight[:, None] * T * (softmax(z / T) - softmax(teacher / T))
    return value, dz / n


def client_forward(p, x):
    x = x[..., None] if x.ndim == 2 else x             # a signal [n, L] has one channel
    P = im2col(x)
    a = P @ p["Conv_0"]["kernel"].reshape(-1, p["Conv_0"]["kernel"].shape[-1]) + p["Conv_0"]["bias"]
    h = np.maximum(a, 0)
    g = h.mean(1)
    z = g @ p["classifier"]["kernel"] + p["classifier"]["bias"]
    return dict(P=P, a=a, h=h.reshape(x.shape[:-1] + (-1,)), g=g, z=z)


def client_grads(p, f, dz):
    dg = dz @ p["classifier"]["kernel"].T
    da = np.repeat(dg[:, None, :], f["a"].shape[1], 1) / f["a"].shape[1] * (f["a"] > 0)
    k = p["Conv_0"]["kernel"]
    return {"Conv_0": {"kernel": np.einsum("npk,npo->ko", f["P"], da).reshape(k.shape),
                       "bias": da.sum((0, 1))},
            "classifier": {"kernel": f["g"].T @ dz, "bias": dz.sum(0)}}


def server_forward(w, h):
    P = im2col(h)
    k = w["Conv_0"]["kernel"]
    a = P @ k.reshape(-1, k.shape[-1]) + w["Conv_0"]["bias"]
    r = np.maximum(a, 0).reshape(len(h), -1)
    u = r @ w["fc"]["kernel"] + w["fc"]["bias"]
    v = np.maximum(u, 0)
    return dict(P=P, a=a, r=r, u=u, v=v, z=v @ w["out"]["kernel"] + w["out"]["bias"])


def server_grads(w, f, dz):
    dv = dz @ w["out"]["kernel"].T
    du = dv * (f["u"] > 0)
    da = (du @ w["fc"]["kernel"].T).reshape(f["a"].shape) * (f["a"] > 0)
    k = w["Conv_0"]["kernel"]
    return {"Conv_0": {"kernel": np.einsum("npk,npo->ko", f["P"], da).reshape(k.shape),
                       "bias": da.sum((0, 1))},
            "fc": {"kernel": f["r"].T @ du, "bias": du.sum(0)},
            "out": {"kernel": f["v"].T @ dz, "bias": dz.sum(0)}}


def tree(f, *trees):
    return {k: tree(f, *(t[k] for t in trees)) if isinstance(trees[0][k], dict)
            else f(*(t[k] for t in trees)) for k in trees[0]}


uniform = jax.jit(jax.random.uniform, static_argnums=1)


def reference_round(state, data, key, *, alpha, T, epochs, batch, distill, mode, client_lr,
                    server_lr, momentum, cohort, work):
    k_part, _, k_server = jax.random.split(key, 3)
    part = jax.jit(participate, static_argnums=(2, 3))(k_part, data, cohort, work)   # its batches
    ids, idx, mask = (np.asarray(a) for a in (part.ids, part.batches.idx, part.batches.step_mask))
    x, y, offsets = np.asarray(data.x, np.float64), np.asarray(data.y), np.asarray(data.offsets)
    z_s_store = np.asarray(state.server.logits, np.float64)
    has = np.asarray(state.server.has_logits)
    rows = jax.tree.map(lambda a: np.asarray(a, np.float64), state.rows["params"])
    new_rows = jax.tree.map(np.copy, rows)
    client_losses, weights = [], []
    H, Zc, Y, EX = [], [], [], []
    W = data.max_client_size
    for c, k in enumerate(ids):
        p = tree(lambda a: a[k], rows)
        losses = []
        for s in np.flatnonzero(mask[c]):
            r = idx[c, s]
            f = client_forward(p, x[r])
            value, dz = loss_and_dz(f["z"], y[r], z_s_store[r], alpha * has[r], T)
            losses.append(value)
            p = tree(lambda a, g: a - client_lr * g, p, client_grads(p, f, dz))
        client_losses.append(np.mean(losses))
        weights.append(offsets[k + 1] - offsets[k])
        jax.tree.map(lambda dst, a: dst.__setitem__(k, a), new_rows, p)
        # upload: every train example of the client, slots c * W + j (padding: invalid)
        lo, n = offsets[k], offsets[k + 1] - offsets[k]
        f = client_forward(p, x[lo:lo + n])
        for j in range(W):
            on = j < n
            H.append(f["h"][j] if on else None), Zc.append(f["z"][j] if on else None)
            Y.append(y[lo + j] if on else None), EX.append(lo + j if on else None)
    valid = np.array([e is not None for e in EX])
    U = len(EX)
    ws = jax.tree.map(lambda a: np.asarray(a, np.float64), state.server.params)
    trace = tree(np.zeros_like, ws)
    recorded, server_losses = {}, []
    for e in range(epochs):
        u = np.asarray(uniform(jax.random.fold_in(k_server, e), U))
        perm = [int(i) for i in np.argsort(np.where(valid, u, 2.0), kind="stable") if valid[i]]
        for b in range(0, len(perm), batch):
            slots = perm[b:b + batch]
            f = server_forward(ws, np.stack([H[i] for i in slots]))
            value, dz = loss_and_dz(f["z"], np.array([Y[i] for i in slots]),
                                    np.stack([Zc[i] for i in slots]),
                                    np.full(len(slots), 1.0 if distill else 0.0), T)
            server_losses.append(value)
            if e == epochs - 1:
                recorded.update({i: f["z"][n] for n, i in enumerate(slots)})
            trace = tree(lambda t, g: momentum * t + g, trace, server_grads(ws, f, dz))
            ws = tree(lambda a, t: a - server_lr * t, ws, trace)
    logits, new_has = z_s_store.copy(), has.copy()
    slots = np.flatnonzero(valid)
    final = server_forward(ws, np.stack([H[i] for i in slots]))["z"]
    for n, i in enumerate(slots):
        logits[EX[i]] = recorded[i] if mode == "last_epoch" else final[n]
        new_has[EX[i]] = True
    answered = sum(bool(has[EX[i]]) for i in slots)
    feature_bytes = int(np.prod(H[slots[0]].shape)) * 4
    K = z_s_store.shape[-1]
    metrics = dict(local_loss=np.sum(np.multiply(client_losses, weights)) / np.sum(weights),
                   server_loss=np.mean(server_losses),
                   bytes_up=valid.sum() * (feature_bytes + K * 4 + 4), bytes_down=answered * K * 4)
    return new_rows, ws, logits, new_has, metrics, ids


def conformance(alg, data, state, key):
    cfg, s = alg.config, alg.setup
    rows, ws, _, _, _, _ = reference_round(
        state, data, key, alpha=cfg["alpha"], T=cfg["temperature"], epochs=cfg["server_epochs"],
        batch=cfg["server_batch_size"] or s.work.batch_size, distill=cfg["server_distill"],
        mode=cfg["server_logits"], client_lr=s.client_opt.lr, server_lr=s.server_opt.lr,
        momentum=s.server_opt.momentum, cohort=s.cohort, work=s.work)
    n = data.num_clients
    return {"clients": {"client": rows,
                        "server": jax.tree.map(lambda a: np.broadcast_to(a, (n,) + a.shape), ws)},
            "rtol": 1e-4, "atol": 1e-5}


REFERENCE = {"fedgkt": conformance}
MODEL = {"fedgkt": "gkt"}
