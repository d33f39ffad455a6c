"""MOON (Li, He, Song, CVPR 2021) in float64 numpy, the MLP's backward pass written out: client k
runs SGD on CE + mu l_con, l_con = -log(e^{s_g/tau} / (e^{s_g/tau} + e^{s_p/tau})), s_g = cos(z,
z_glob), s_p = cos(z, z_prev), z the last hidden layer (the model's features), z_prev from the
client's previous model (its row); the server averages the local models by n_k (dropped
stragglers and step-less clients weigh 0)."""
import numpy as np

from tests.references._common import broadcast, participation

EPS = 1e-8


def layers(params):
    hidden = [params[f"hidden_layers_{i}"] for i in range(len(params) - 1)]
    f64 = lambda d: (np.asarray(d["kernel"], np.float64), np.asarray(d["bias"], np.float64))
    return [f64(h) for h in hidden], f64(params["out"])


def features(hidden, x):
    acts = [x.reshape(len(x), -1)]
    for W, b in hidden:
        acts.append(np.maximum(acts[-1] @ W + b, 0.0))
    return acts


def cos_and_grad(z, u):
    """cos(z_n, u_n) per row (norms clamped at EPS) and its gradient with respect to z_n."""
    nz = np.maximum(np.linalg.norm(z, axis=1, keepdims=True), EPS)
    nu = np.maximum(np.linalg.norm(u, axis=1, keepdims=True), EPS)
    c = np.sum(z * u, 1, keepdims=True) / (nz * nu)
    grad = u / (nz * nu) - c * z / nz ** 2 * (np.linalg.norm(z, axis=1, keepdims=True) >= EPS)
    return c[:, 0], grad


def grads(hidden, out, x, y, z_glob, z_prev, mu, tau):
    acts = features(hidden, x)
    z = acts[-1]
    logits = z @ out[0] + out[1]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    d_logits = p / len(y)
    g_out = (z.T @ d_logits, d_logits.sum(0))
    d_z = d_logits @ out[0].T
    s_g, ds_g = cos_and_grad(z, z_glob)
    s_p, ds_p = cos_and_grad(z, z_prev)
    e_g, e_p = np.exp(s_g / tau), np.exp(s_p / tau)
    pi_g = e_g / (e_g + e_p)
    d_z += mu / len(y) * (((pi_g - 1.0) / tau)[:, None] * ds_g + ((1.0 - pi_g) / tau)[:, None] * ds_p)
    g_hidden = []
    for i in range(len(hidden) - 1, -1, -1):
        d_pre = d_z * (acts[i + 1] > 0)
        g_hidden.insert(0, (acts[i].T @ d_pre, d_pre.sum(0)))
        d_z = d_pre @ hidden[i][0].T
    return g_hidden, g_out


def moon(alg, data, state, key):
    mu, tau, lr = alg.config["mu"], alg.config["tau"], alg.setup.client_opt.lr
    hidden0, out0 = layers(alg.global_params(state))
    part = participation(alg, data, key)
    x, y = np.asarray(data.x, np.float64), np.asarray(data.y)
    rows = state.rows
    new, weights = [], []
    for c, i in enumerate(part["ids"]):                  # reference loop over clients
        prev_hidden, _ = layers({k: {kk: np.asarray(v)[i] for kk, v in d.items()} for k, d in rows.items()})
        hidden, out = [(W.copy(), b.copy()) for W, b in hidden0], (out0[0].copy(), out0[1].copy())
        for s in range(part["idx"].shape[1]):
            if not part["mask"][c, s]:
                continue
            xb, yb = x[part["idx"][c, s]], y[part["idx"][c, s]]
            g_h, g_o = grads(hidden, out, xb, yb, features(hidden0, xb)[-1], features(prev_hidden, xb)[-1],
                             mu, tau)
            hidden = [(W - lr * gW, b - lr * gb) for (W, b), (gW, gb) in zip(hidden, g_h)]
            out = (out[0] - lr * g_o[0], out[1] - lr * g_o[1])
        new.append((hidden, out))
        dropped = part["mask"][c].sum() == 0 or (alg.config["drop_stragglers"] and part["is_straggler"][c])
        weights.append(0.0 if dropped else part["num_examples"][c])
    q = np.asarray(weights) / np.sum(weights)
    avg = lambda get: sum(qk * get(m) for qk, m in zip(q, new))
    result = {f"hidden_layers_{i}": {"kernel": avg(lambda m: m[0][i][0]), "bias": avg(lambda m: m[0][i][1])}
              for i in range(len(hidden0))}
    result["out"] = {"kernel": avg(lambda m: m[1][0]), "bias": avg(lambda m: m[1][1])}
    return {"global": result, "clients": broadcast(result, data.num_clients)}


REFERENCE = {"moon": moon}
MODEL = {"moon": "mlp"}
