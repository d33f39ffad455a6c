"""FedAMP and HeurFedAMP (Huang et al., AAAI 2021), one round written from the paper, one client at
a time: u_i = sum_j xi_ij w_j (attentive message passing; xi_ij = alpha_k A'(||w_i - w_j||^2) with
A(x) = 1 - exp(-x / sigma), xi_ii = 1 - sum_j xi_ij; HeurFedAMP: xi_ij proportional to
exp(sigma cos(w_i, w_j)), xi_ii = self_weight), then local SGD on F_i(w) + lam / (2 alpha_k)
||w - u_i||^2. The deployed model is the client's own w_i (the rows)."""
import numpy as np

from tests.references._common import participation, softmax_grads


def paper_attention(flat, i, cand, *, attention, alpha_k, sigma, self_weight):
    """{j: xi_ij} of client i over the candidates, written out from the paper (float64, pairs)."""
    if attention == "none":                                     # the no-message-passing ablation
        return {i: 1.0}
    if attention == "exp":
        A = lambda x: 1.0 - np.exp(-x / sigma)                 # the attention-inducing function
        dA = lambda x, h=1e-5: (A(x + h) - A(x - h)) / (2 * h)  # A' by central differences
        xi = {j: alpha_k * dA(np.sum((flat[i] - flat[j]) ** 2)) for j in cand if j != i}
        xi[i] = 1.0 - sum(xi.values())
        return xi
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    e = {j: np.exp(sigma * cos(flat[i], flat[j])) for j in cand if j != i}
    xi = {j: (1 - self_weight) * v / sum(e.values()) for j, v in e.items()}
    xi[i] = self_weight
    return xi


def reference_round(K, B, part, x, y, *, neighbors, start, lam, alpha_k, lr, attend):
    """One FedAMP round, one client at a time: u_i = sum_j xi_ij w_j, then local SGD on
    F_i(w) + lam / (2 alpha_k) ||w - u_i||^2. Returns (kernel, bias, xi [C, candidates])."""
    ids, idx, mask = (np.asarray(a) for a in (part.ids, part.batches.idx, part.batches.step_mask))
    flat = np.concatenate([B, K.reshape(K.shape[0], -1)], axis=1)
    cand = range(K.shape[0]) if neighbors == "all" else sorted(set(ids))   # one column a client
    newK, newB, xis = K.copy(), B.copy(), []
    for c, i in enumerate(ids):
        xi = attend(flat, i, cand)
        xis.append(xi)
        uK, uB = sum(w * K[j] for j, w in xi.items()), sum(w * B[j] for j, w in xi.items())
        W, b = (K[i].copy(), B[i].copy()) if start == "own" else (uK.copy(), uB.copy())
        for s in np.flatnonzero(mask[c]):
            gW, gb = softmax_grads(W, b, x[idx[c, s]], y[idx[c, s]])
            W = W - lr * (gW + lam / alpha_k * (W - uK))
            b = b - lr * (gb + lam / alpha_k * (b - uB))
        newK[i], newB[i] = W, b
    return newK, newB, xis


def conformance(alg, data, state, key):
    cfg = alg.config
    attention = cfg.get("attention", "cosine")        # heurfedamp: cosine attention
    K, B = (np.array(state.rows["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
    part = participation(alg, data, key)

    class Part:                                        # the fields reference_round reads
        ids = part["ids"]

        class batches:
            idx, step_mask = part["idx"], part["mask"]
    attend = lambda flat, i, cand: paper_attention(
        flat, i, cand, attention=attention, alpha_k=cfg["alpha_k"], sigma=cfg["sigma"],
        self_weight=cfg["self_weight"])
    x, y = np.asarray(data.x, np.float64), np.asarray(data.y)
    newK, newB, _ = reference_round(K, B, Part, x, y, neighbors=cfg["neighbors"],
                                    start=cfg["start"], lam=cfg["lam"], alpha_k=cfg["alpha_k"],
                                    lr=alg.setup.client_opt.lr, attend=attend)
    return {"clients": {"Dense_0": {"bias": newB, "kernel": newK}}}


REFERENCE = {"fedamp": conformance, "heurfedamp": conformance}
