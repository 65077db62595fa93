"""One decode step of a small Llama for one row, compiled with numba (`fast_decode`'s single stream).

At batch 1 an IMelodist-tiny token is ~25 vector-matrix products over 21 MB of weights (read
from L3: ~0.77 ms here, whether NumPy's OpenBLAS or this loop does it) and ~200 small NumPy calls
between them (RMSNorm, RoPE, attention, SwiGLU: ~0.3 ms of interpreter and dispatch, measured).
`row_step` runs the whole step in one compiled call, so only the weights' reading is left.

The arithmetic is `LeanLlama`'s (weights as it stores them: RMSNorm weights and attention's scale
folded in, gate and down negated); the sums run in another order than OpenBLAS's (reductions may
be reassociated: `fastmath={"reassoc", "contract"}`, nothing else), so logits agree with NumPy's
and torch's to ~1e-5, as NumPy's agree with torch's. Compiled on first use (~2-6 s) and cached
beside this file (`cache=True`) for later processes.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

_FLAGS = {"reassoc", "contract"}  # vectorised sums and fused multiply-adds; infinities and NaN kept


@njit(cache=True, nogil=True, fastmath=_FLAGS)
def _vec_mat(x, w, out):
    """out = x @ w for w (n_in, n_out), row by row (each row of w read once, in order)."""
    n_in, n_out = w.shape
    for j in range(n_out):
        out[j] = 0.0
    for i in range(n_in):
        xi = x[i]
        for j in range(n_out):
            out[j] += xi * w[i, j]


@njit(cache=True, nogil=True, fastmath=_FLAGS)
def _unit_rms(x, eps, out):
    """out = x / rms(x) (RMSNorm without its weight, which the next matrix holds)."""
    total = 0.0
    for i in range(x.shape[0]):
        total += np.float64(x[i]) * x[i]
    scale = np.float32(1.0 / math.sqrt(total / x.shape[0] + eps))
    for i in range(x.shape[0]):
        out[i] = x[i] * scale


@njit(cache=True, nogil=True, fastmath=_FLAGS)
def row_step(token, position, length, embed, qkv, o, gate_up, down, lm_head, cache, cos, sin,
             eps, heads, kv_heads, head_dim, head, out):
    """One token at `position` of a single row; attends to cache positions 0..length-1 (the
    new one written at `position` first). Stacked weights: qkv (L, H, q+2kv), o (L, q, H),
    gate_up (L, H, 2I), down (L, I, H), lm_head (H, V); cache (L, positions, 2 kv): keys then
    values; cos/sin: `LeanLlama.rope_table`. Writes the logits (V,) into `out`, or with
    head=False the final normed hidden state (H,)."""
    hidden = embed.shape[1]
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    group, half, inter = heads // kv_heads, head_dim // 2, down.shape[1]
    x = embed[token].copy()
    unit = np.empty(hidden, np.float32)
    proj = np.empty(qkv.shape[2], np.float32)
    mixed = np.empty(q_size, np.float32)
    scores = np.empty((group, length), np.float32)
    gu = np.empty(gate_up.shape[2], np.float32)
    h = np.empty(down.shape[1], np.float32)
    delta = np.empty(hidden, np.float32)
    for layer in range(qkv.shape[0]):
        _unit_rms(x, eps, unit)
        _vec_mat(unit, qkv[layer], proj)
        for j in range(0, q_size + kv_size, head_dim):  # RoPE: x*cos + (halves swapped)*signed sin
            for d in range(half):
                a, b = proj[j + d], proj[j + half + d]
                proj[j + d] = a * cos[position, j + d] + b * sin[position, j + d]
                proj[j + half + d] = b * cos[position, j + half + d] + a * sin[position, j + half + d]
        kv = cache[layer]
        for j in range(2 * kv_size):
            kv[position, j] = proj[q_size + j]
        for g in range(kv_heads):  # the group of query heads sharing key head g
            k0, q0 = g * head_dim, g * group * head_dim
            queries = proj[q0:q0 + group * head_dim].reshape(group, head_dim)
            for t in range(length):  # each key read once for the whole group
                key = kv[t, k0:k0 + head_dim]
                for r in range(group):
                    s = np.float32(0.0)
                    for d in range(head_dim):
                        s += queries[r, d] * key[d]
                    scores[r, t] = s
            for r in range(group):  # softmax as fast_decode._softmax_
                top = scores[r, 0]
                for t in range(1, length):
                    top = max(top, scores[r, t])
                total = np.float32(0.0)
                for t in range(length):
                    e = np.exp(scores[r, t] - top)
                    scores[r, t] = e
                    total += e
                for t in range(length):
                    scores[r, t] /= total
            mix = np.zeros((group, head_dim), np.float32)
            for t in range(length):
                value = kv[t, kv_size + k0:kv_size + k0 + head_dim]
                for r in range(group):
                    w = scores[r, t]
                    for d in range(head_dim):
                        mix[r, d] += w * value[d]
            mixed[q0:q0 + group * head_dim] = mix.ravel()
        _vec_mat(mixed, o[layer], delta)
        for i in range(hidden):
            x[i] += delta[i]
        _unit_rms(x, eps, unit)
        _vec_mat(unit, gate_up[layer], gu)
        for j in range(inter):  # gate stored negated: silu(g) * u == -g / (1 + exp(-g)) * u ...
            minus_gate = gu[j]
            h[j] = minus_gate / (np.float32(1.0) + np.exp(minus_gate)) * gu[inter + j]
        _vec_mat(h, down[layer], delta)  # ... and down negated back
        for i in range(hidden):
            x[i] += delta[i]
    if head:
        _unit_rms(x, eps, unit)
        _vec_mat(unit, lm_head, out)
    else:
        _unit_rms(x, eps, out)


@njit(cache=True, nogil=True, fastmath=_FLAGS)
def rows_dot(rows, ids, unit, out):
    """out[i] = rows[ids[i]] @ unit: a few tokens' logits from the LM head's rows (V, H), each
    row read where it lies (no gathered copy)."""
    for i in range(ids.shape[0]):
        row = rows[ids[i]]
        total = np.float32(0.0)
        for j in range(unit.shape[0]):
            total += row[j] * unit[j]
        out[i] = total
