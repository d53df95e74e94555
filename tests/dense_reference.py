"""Dense reference: every algorithm as matrix formulas over all workers' states at once.

X is `[n, ...]` (row i = worker i), W the full mixing matrix: a fixed matrix, or a
topology whose round t has the matrix W_t = W.at(t) (graphs over time). Nothing here
knows about half-edges, processes or packing: it is the papers' math, written as
plainly as possible, to check the batched implementations in algorithms.py against.
Randomness is shared with the implementation by seed (edge_seed, WorkerRandom streams).
"""
import math

import numpy as np
import torch

from powergossip import algorithms
from powergossip.compressors import WorkerRandom


def at(W, t):
    """W_t: round t's matrix of a topology (static or over time), or W itself when it is a matrix."""
    return W.at(t).diffusion_matrix if hasattr(W, "at") else W


def mix(W, X):
    """(W X) over the worker axis."""
    W = torch.tensor(W, dtype=X.dtype)
    return (W @ X.reshape(X.shape[0], -1)).reshape(X.shape)


def gossip(W, Xs, gamma, t=0):
    """Round t: x <- x + gamma (W_t - I) x."""
    return [X + gamma * (mix(at(W, t), X) - X) for X in Xs]


def push_sum(W, Xs, gamma, steps):
    """Kempe et al. 2003: x <- P_t x, w <- P_t w (P_t = (1 - gamma) I + gamma W_t), z = x / w."""
    weight = torch.ones(Xs[0].shape[0], 1, dtype=Xs[0].dtype)
    Xs = [X.clone() for X in Xs]
    for t in range(steps):
        Xs = [X * weight.view((-1,) + (1,) * (X.dim() - 1)) for X in Xs]
        Xs, (weight,) = gossip(W, Xs, gamma, t), gossip(W, [weight], gamma, t)
        Xs = [X / weight.view((-1,) + (1,) * (X.dim() - 1)) for X in Xs]
    return Xs


def push_sum_delayed(W, Xs, gamma, steps):
    """Overlapped SGP with tau = 1 (Assran et al. 2019, Algorithm 3): P_t = (1 - gamma) I + gamma W_t
    split into its diagonal D_t (kept) and the rest O_t (sent); what round t sends arrives at round t + 1:
    (x, w) <- D_t (x, w) + O_{t-1} (x, w)^{(t-1)}, z = x / w. Returns z, w and the (x, w) in flight."""
    weight = torch.ones(Xs[0].shape[0], 1, dtype=Xs[0].dtype)
    Xs = [X.clone() for X in Xs]
    in_flight = [torch.zeros_like(X) for X in Xs + [weight]]
    for t in range(steps):
        P = (1 - gamma) * np.eye(len(weight)) + gamma * at(W, t)
        kept, sent = np.diag(np.diag(P)), P - np.diag(np.diag(P))
        values = [X * weight.view((-1,) + (1,) * (X.dim() - 1)) for X in Xs] + [weight]
        values, in_flight = [mix(kept, V) + M for V, M in zip(values, in_flight)], [mix(sent, V) for V in values]
        *Xs, weight = values
        Xs = [X / weight.view((-1,) + (1,) * (X.dim() - 1)) for X in Xs]
    return Xs, weight, in_flight


def all_reduce(Xs):
    return [X.mean(dim=0, keepdim=True).expand_as(X).clone() for X in Xs]


def round_trip(compressor, Xs, randomness):
    shapes = [X.shape[1:] for X in Xs]
    return compressor.decompress(compressor.compress(Xs, randomness), shapes)


def choco(W, Xs, gamma, compressor, steps, seed=0):
    """q = C(x - x_hat); x_hat += q; s += W q; x += gamma (s - x_hat)."""
    n = Xs[0].shape[0]
    randomness = WorkerRandom(seed, range(n), torch.device("cpu"), algorithms.COMPRESSOR_STREAM)
    x_hat = [torch.zeros_like(X) for X in Xs]
    s = [torch.zeros_like(X) for X in Xs]
    Xs = [X.clone() for X in Xs]
    for t in range(steps):
        qs = round_trip(compressor, [X - H for X, H in zip(Xs, x_hat)], randomness)
        x_hat = [H + Q for H, Q in zip(x_hat, qs)]
        s = [S + mix(at(W, t), Q) for S, Q in zip(s, qs)]
        Xs = [X + gamma * (S - H) for X, S, H in zip(Xs, s, x_hat)]
    return Xs


def deep_squeeze(W, Xs, gamma, compressor, steps, seed=0):
    """v = x + delta; c = C(v); delta = v - c; x += gamma (W - I) c."""
    n = Xs[0].shape[0]
    randomness = WorkerRandom(seed, range(n), torch.device("cpu"), algorithms.COMPRESSOR_STREAM)
    delta = [torch.zeros_like(X) for X in Xs]
    Xs = [X.clone() for X in Xs]
    for t in range(steps):
        v = [X + D for X, D in zip(Xs, delta)]
        c = round_trip(compressor, v, randomness)
        delta = [V - C for V, C in zip(v, c)]
        Xs = [X + gamma * (mix(at(W, t), C) - C) for X, C in zip(Xs, c)]
    return Xs


def moniqua(W, Xs, gamma, theta, steps, seed=0):
    """The 2-bit Moniqua of Lu & De Sa 2020, all pairs (i, j) at once as an [n, n, D] tensor."""
    n = Xs[0].shape[0]
    randomness = WorkerRandom(seed, range(n), torch.device("cpu"), algorithms.MONIQUA_STREAM)
    delta = 1 / 3
    B = 2 * theta / (1 - 2 * delta)

    def mod(x, a):
        return torch.fmod(x + torch.sign(x) * a / 2, a) - torch.sign(x) * a / 2

    sizes = [X[0].numel() for X in Xs]
    x = torch.cat([X.reshape(n, -1) for X in Xs], dim=1)
    for t in range(steps):
        W_off = torch.tensor(at(W, t), dtype=x.dtype) * (1 - torch.eye(n, dtype=x.dtype))
        y = mod(x / B, 1.0) + 0.5
        q = torch.floor(y / delta + randomness.uniform((x.shape[1],))) * delta - 0.5
        e = q * B - mod(x, B)
        pairwise = mod(q[None, :, :] * B - x[:, None, :], B) - e[:, None, :]  # [i, j, D]
        x = x + gamma * (W_off[:, :, None] * pairwise).sum(dim=1)
    return [part.reshape(X.shape) for part, X in zip(x.split(sizes, dim=1), Xs)]


def power_gossip(W, X, gamma, rank, steps, num_iterations=1, warm_start=True, round_weights=False, seed=0,
                 edge_memory=None):
    """PowerGossip on one parameter `[n, m, k]` (a single matrix per worker), edge by edge.

    Each edge {i < j} of round t's graph holds P (m x r) and Q (k x r) drawn from its shared
    generator (P first, then Q) when it first appears, and counts its half-steps h; its state
    is dropped once it has been absent for more than `edge_memory` rounds (None: the period
    - 1, or 16 without one) and drawn afresh (from a generator seeded by the edge and the
    round) when it comes back. Iteration k of a step (none in the first step): D = X_j - X_i;
    edges with h + k even: normalize P, Q = D^T P; then, from the X they left, edges with
    h + k odd: normalize Q, P = D Q; each group does X_i += gamma w_ij P Q^T and
    X_j -= gamma w_ji P Q^T, all its edges from the same X."""
    n, m, k = X.shape
    r = min(rank, m, k)
    if edge_memory is None:
        period = getattr(W, "period", 1)
        edge_memory = period - 1 if period else 16
    generators, P, Q, half_steps, last_seen = {}, {}, {}, {}, {}

    def normalize(v):
        if round_weights:
            return v.sign() / math.sqrt(v.shape[0])
        return algorithms.orthogonalize_(v.clone())

    X = X.clone()
    for step in range(steps):
        W_t = at(W, step)
        for e in [e for e, seen in last_seen.items() if seen < step - 1 - edge_memory]:
            del generators[e], P[e], Q[e], half_steps[e], last_seen[e]
        edges = [(i, j) for i in range(n) for j in range(i + 1, n) if W_t[i, j] > 0]
        for e in edges:
            if e not in generators:
                generators[e] = torch.Generator().manual_seed(algorithms.edge_seed(seed, *e, since=step))
                P[e] = torch.randn(m * r, generator=generators[e]).reshape(m, r)
                Q[e] = torch.randn(k * r, generator=generators[e]).reshape(k, r)
                half_steps[e] = 0
            last_seen[e] = step
        for iteration in range(num_iterations if step > 0 else 0):
            for parity in (0, 1):
                update = torch.zeros_like(X)
                for e in [e for e in edges if (half_steps[e] + iteration) % 2 == parity]:
                    i, j = e
                    D = X[j] - X[i]
                    if parity == 0:
                        if not warm_start:
                            P[e] = torch.randn(m * r, generator=generators[e]).reshape(m, r)
                        P[e] = normalize(P[e])
                        Q[e] = D.T @ P[e]
                    else:
                        if not warm_start:
                            Q[e] = torch.randn(k * r, generator=generators[e]).reshape(k, r)
                        Q[e] = normalize(Q[e])
                        P[e] = D @ Q[e]
                    approximation = P[e] @ Q[e].T
                    update[i] += gamma * W_t[i, j] * approximation
                    update[j] -= gamma * W_t[j, i] * approximation
                X = X + update
        for e in edges:
            half_steps[e] += num_iterations
    return X


def powersgd(gradient_steps, q0, num_iterations, start_compressing_after_num_steps):
    """PowerSGD (Vogels et al. 2019, Algorithm 1 with error feedback) over all workers at once.
    `gradient_steps`: per step, a list of `[n, *shape]` gradients; `q0`: parameter index ->
    Q [n_columns, r] for the matrices worth compressing. Returns per step the averaged gradient
    (`[*shape]` each) every worker steps with. Orthogonalization by QR: any orthonormal basis
    of the same columns gives the same P P^T M, which is all the update depends on."""
    def orthonormal(A):
        return torch.linalg.qr(A).Q

    memory, qs, updates = None, dict(q0), []
    for step, grads in enumerate(gradient_steps):
        if memory is None:
            memory = [torch.zeros_like(G) for G in grads]
        averaged = []
        for k, G in enumerate(grads):
            if k not in qs or step < start_compressing_after_num_steps:
                averaged.append(G.mean(dim=0))
                continue
            n, m = G.shape[0], G.shape[1]
            M = (G + memory[k]).reshape(n, m, -1)  # M_i = G_i + E_i
            for _ in range(num_iterations):
                P = orthonormal((M @ orthonormal(qs[k])).mean(dim=0))  # P <- mean_i M_i Q; orthogonalize
                qs[k] = (M.transpose(1, 2) @ P).mean(dim=0)  # Q <- mean_i M_i^T P
            update = P @ qs[k].T
            memory[k] = (M - update).reshape(G.shape)  # E_i = M_i - P Q^T
            averaged.append(update.reshape(G.shape[1:]))
        updates.append(averaged)
    return updates


def tree_distances(tree) -> list[list[int]]:
    """d(i, k): hops between workers i and k on a tree Topology."""
    import networkx
    graph = networkx.Graph(tree.edges())
    graph.add_nodes_from(range(tree.n_workers))
    lengths = dict(networkx.all_pairs_shortest_path_length(graph))
    return [[lengths[i][k] for k in range(tree.n_workers)] for i in range(tree.n_workers)]


def relay_sum(topology, Xs, steps, local_step):
    """RelaySum as the delayed average it computes: with Z_s = local_step(X_s) (x^{s+1/2}),
    x_i^{t+1} = (1/n) sum_k Z_{t - max(d(i, k) - 1, 0)}[k], where a round before 0 stands for
    worker i's own x^0 (the fill-in). On two trees, tree k gives the entries k::2 of each flat parameter."""
    trees = getattr(topology, "trees", (topology,))
    distances = [tree_distances(tree) for tree in trees]
    n = Xs[0].shape[0]
    history, X0s = [], [X.clone() for X in Xs]
    for t in range(steps):
        history.append(local_step(Xs))
        new = []
        for k_param, X in enumerate(Xs):
            flat = torch.zeros_like(X).reshape(n, -1)
            for tree, d in enumerate(distances):
                entries = slice(tree, None, len(trees))
                for i in range(n):
                    for k in range(n):
                        s = t - max(d[i][k] - 1, 0)
                        term = history[s][k_param][k] if s >= 0 else X0s[k_param][i]
                        flat[i, entries] += term.reshape(-1)[entries] / n
            new.append(flat.reshape(X.shape))
        Xs = new
    return Xs


def d2(W, Xs, steps, gradient, learning_rate):
    """Tang et al. 2018: X_1 = W (X_0 - lr G_0), X_{t+1} = W (2 X_t - X_{t-1} - lr (G_t - G_{t-1}))."""
    previous, previous_gradient = None, None
    for t in range(steps):
        G = gradient(Xs)
        if previous is None:
            new = [mix(W, X - learning_rate * g) for X, g in zip(Xs, G)]
        else:
            new = [mix(W, 2 * X - P - learning_rate * (g - h)) for X, P, g, h in zip(Xs, previous, G, previous_gradient)]
        previous, previous_gradient, Xs = Xs, G, new
    return Xs


def gradient_tracking(W, Xs, steps, gradient, learning_rate):
    """x^{t+1} = W_t (x^t - lr y^t), y^{t+1} = W_t y^t + g^{t+1} - g^t, y^0 = g^0 (adapt then combine)."""
    G = gradient(Xs)
    Y = G
    for t in range(steps):
        Xs = [mix(at(W, t), X - learning_rate * y) for X, y in zip(Xs, Y)]
        new_G = gradient(Xs)
        Y = [mix(at(W, t), y) + g_new - g for y, g_new, g in zip(Y, new_G, G)]
        G = new_G
    return Xs
