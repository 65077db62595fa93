"""A small Llama's decode step, for one row or several, and the sampling after it, compiled with
numba (`fast_decode`'s decode loop).

At batch 1 an IMelodist-tiny token is ~25 vector-matrix products over 21 MB of weights (read
from L3: ~0.77 ms here, whether NumPy's OpenBLAS or this loop does it) and ~200 small NumPy calls
between them (RMSNorm, RoPE, attention, SwiGLU: ~0.3 ms of interpreter and dispatch, measured).
`rows_step` runs the whole step in one compiled call, so only the weights' reading is left; for
several rows it reads each weight once for all of them.

The arithmetic is `LeanLlama`'s (weights as it stores them: RMSNorm weights and attention's scale
folded in, gate and down negated); the sums run in another order than OpenBLAS's (reductions may
be reassociated: `fastmath={"reassoc", "contract"}`, nothing else), so logits agree with NumPy's
and torch's to ~1e-5, as NumPy's agree with torch's. Compiled on first use (~2-6 s) and cached
beside this file (`cache=True`) for later processes.

`sample_token` and `mask_ids` do in one call each what ~20 NumPy calls did after every step
(masking, temperature, top-k, top-p, the exponential-noise draw; a grammar bitmask's allowed ids):
~60 us a token, now ~10 us.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

_FLAGS = {"reassoc", "contract"}  # vectorised sums and fused multiply-adds; infinities and NaN kept


@njit(cache=True, nogil=True, fastmath=_FLAGS)
def _rows_mat(x, w, out):
    """out = x @ w for x (B, n_in), w (n_in, n_out): each row of w read once, in order, and used
    for every row of x while it is in cache (a row's sums run in the same order whatever B is)."""
    n_in, n_out = w.shape
    for b in range(x.shape[0]):
        for j in range(n_out):
            out[b, j] = 0.0
    for i in range(n_in):
        for b in range(x.shape[0]):
            xi = x[b, i]
            for j in range(n_out):
                out[b, j] += xi * w[i, j]


@njit(cache=True, nogil=True, fastmath=_FLAGS)
def _unit_rms(x, eps, out):
    """out = x / rms(x) per row (RMSNorm without its weight, which the next matrix holds)."""
    for b in range(x.shape[0]):
        total = 0.0
        for i in range(x.shape[1]):
            total += np.float64(x[b, i]) * x[b, i]
        scale = np.float32(1.0 / math.sqrt(total / x.shape[1] + eps))
        for i in range(x.shape[1]):
            out[b, i] = x[b, i] * scale


@njit(cache=True, nogil=True, fastmath=_FLAGS)
def rows_step(tokens, positions, embed, qkv, o, gate_up, down, lm_head, cache, cos, sin,
              eps, heads, kv_heads, head_dim, head, out):
    """One new token per row: row b's token at positions[b], attending to its own cache positions
    0..positions[b] (the new one written there first). Stacked weights: qkv (L, H, q+2kv),
    o (L, q, H), gate_up (L, H, 2I), down (L, I, H), lm_head (H, V); cache (L, B, positions,
    2 kv): keys then values; cos/sin: `LeanLlama.rope_table`. Writes the logits (B, V) into `out`,
    or with head=False the final normed hidden states (B, H). The weights are read once for all
    rows, and a row's arithmetic is the same alone or in a batch."""
    rows, hidden = tokens.shape[0], embed.shape[1]
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    group, half, inter = heads // kv_heads, head_dim // 2, down.shape[1]
    x = np.empty((rows, hidden), np.float32)
    for b in range(rows):
        x[b] = embed[tokens[b]]
    unit = np.empty((rows, hidden), np.float32)
    proj = np.empty((rows, qkv.shape[2]), np.float32)
    mixed = np.empty((rows, q_size), np.float32)
    scores = np.empty((group, cache.shape[2]), np.float32)
    mix = np.empty((group, head_dim), np.float32)
    gu = np.empty((rows, gate_up.shape[2]), np.float32)
    h = np.empty((rows, down.shape[1]), np.float32)
    delta = np.empty((rows, hidden), np.float32)
    for layer in range(qkv.shape[0]):
        _unit_rms(x, eps, unit)
        _rows_mat(unit, qkv[layer], proj)
        for b in range(rows):
            position, length = positions[b], positions[b] + 1
            p = proj[b]
            for j in range(0, q_size + kv_size, head_dim):  # RoPE: x*cos + (halves swapped)*signed sin
                for d in range(half):
                    a, c = p[j + d], p[j + half + d]
                    p[j + d] = a * cos[position, j + d] + c * sin[position, j + d]
                    p[j + half + d] = c * cos[position, j + half + d] + a * sin[position, j + half + d]
            kv = cache[layer, b]
            for j in range(2 * kv_size):
                kv[position, j] = p[q_size + j]
            for g in range(kv_heads):  # the group of query heads sharing key head g
                k0, q0 = g * head_dim, g * group * head_dim
                queries = p[q0:q0 + group * head_dim].reshape(group, head_dim)
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
                mix[:] = 0.0
                for t in range(length):
                    value = kv[t, kv_size + k0:kv_size + k0 + head_dim]
                    for r in range(group):
                        w = scores[r, t]
                        for d in range(head_dim):
                            mix[r, d] += w * value[d]
                mixed[b, q0:q0 + group * head_dim] = mix.ravel()
        _rows_mat(mixed, o[layer], delta)
        x += delta
        _unit_rms(x, eps, unit)
        _rows_mat(unit, gate_up[layer], gu)
        for b in range(rows):
            for j in range(inter):  # gate stored negated: silu(g) * u == -g / (1 + exp(-g)) * u ...
                minus_gate = gu[b, j]
                h[b, j] = minus_gate / (np.float32(1.0) + np.exp(minus_gate)) * gu[b, inter + j]
        _rows_mat(h, down[layer], delta)  # ... and down negated back
        x += delta
    if head:
        _unit_rms(x, eps, unit)
        _rows_mat(unit, lm_head, out)
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


@njit(cache=True, nogil=True)
def _softmax_sum(values, out):
    """out = exp(values - max) (float32); returns their float32 sum."""
    top = values[0]
    for i in range(1, values.shape[0]):
        top = max(top, values[i])
    total = np.float32(0.0)
    for i in range(values.shape[0]):
        out[i] = np.exp(values[i] - top)
        total += out[i]
    return total


@njit(cache=True, nogil=True)
def sample_token(scores, allowed, ids, temperature, top_k, drop_at_most, noise):
    """`fast_decode.sample_row` in one compiled call: the token of `scores` (float32 logits)
    that temperature, top-k (ties at the k-th value kept), top-p and argmax(probs / noise) pick.
    `allowed` (bools, same length as scores; empty: all) masks tokens first; `ids` (empty: the
    identity) maps positions of `scores` to token ids, which index `noise`; `drop_at_most` is
    float32(1 - top_p), or a negative number for no top-p. -1 when nothing is allowed."""
    n = scores.shape[0]
    values = np.empty(n, np.float32)
    for i in range(n):
        masked = allowed.shape[0] > 0 and not allowed[i]
        values[i] = -np.inf if masked else scores[i] / temperature
    kth = np.float32(-np.inf)
    if 0 < top_k < n:
        kth = np.partition(values, n - top_k)[n - top_k]
    kept = np.empty(n, np.int64)
    m = 0
    for i in range(n):
        if values[i] >= kth and values[i] > -np.inf:
            kept[m] = i
            m += 1
    if m == 0:
        return -1
    kept = kept[:m]
    kept_values = values[kept]
    probs = np.empty(m, np.float32)
    if drop_at_most >= 0:
        order = np.argsort(kept_values, kind="mergesort")
        total = _softmax_sum(kept_values[order], probs)
        running = 0.0  # float64, as torch's CPU cumsum adds; compared as float32
        keep = np.ones(m, np.bool_)
        for j in range(m - 1):  # the most probable is always kept
            running += np.float64(probs[j] / total)
            if np.float32(running) <= drop_at_most:
                keep[order[j]] = False
        kept, kept_values = kept[keep], kept_values[keep]
        m = kept.shape[0]
    total = _softmax_sum(kept_values, probs)
    best, best_score = 0, np.float32(-1.0)
    for j in range(m):
        token = kept[j] if ids.shape[0] == 0 else ids[kept[j]]
        score = probs[j] / total / noise[token]
        if score > best_score:
            best, best_score = token, score
    return best


@njit(cache=True, nogil=True)
def mask_ids(words, allowed, vocab):
    """The token ids below `vocab` (ascending) that xgrammar's bitmask row `words` (int32: token
    t at bit t % 32 of word t // 32) allows and, unless it is empty, the bool row `allowed` too."""
    out = np.empty(vocab, np.int64)
    m = 0
    for w in range(min(words.shape[0], (vocab + 31) // 32)):
        bits = np.uint32(words[w])
        if bits == 0:
            continue
        for b in range(32):
            t = w * 32 + b
            if (bits >> np.uint32(b)) & np.uint32(1) and t < vocab and (allowed.shape[0] == 0 or allowed[t]):
                out[m] = t
                m += 1
    return out[:m]
