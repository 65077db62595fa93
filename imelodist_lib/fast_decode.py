"""A lean CPU decode path for small Llama models: the same tokens as `generate`, several times faster.

A 5M-parameter model needs ~10 MFLOP a token, so on a CPU `model.generate` spends nearly all its
time in framework overhead (module calls, cache objects, logits processors), not arithmetic.
`LeanLlama` reads a `LlamaForCausalLM`'s weights once into NumPy float32 arrays (q, k and v in
one matrix, gate and up in one, each RMSNorm's weight and attention's 1/sqrt(head_dim) folded into
the matrix after it, layers stacked), keeps a preallocated KV cache, runs prefills as NumPy matrix
products (OpenBLAS) and each decode step, of one row or many, as one compiled call
(`fast_kernels.rows_step`, numba: several rows read the weights once, and a row's arithmetic is
the same alone or in a batch, so batched answers equal unbatched ones bit for bit).

Why these (measured on the 2-core shared machine, CPU time at one thread): a NumPy call costs
~1-3 us against torch's ~5-10 us, and NumPy's OpenBLAS beat torch's MKL on these products, so an
eager-torch version of this path took ~5.5 ms a step against NumPy's ~3.1 ms (load 5-7). At
batch 1 a step is then ~25 vector-matrix products that read the 21 MB of weights from L3
(~0.77 ms, whether OpenBLAS or a compiled loop does it: the floor no runtime removes) and ~200
small NumPy calls between them (~0.3 ms); the compiled step leaves only the reading: 0.91 ms
against 1.12 ms at 200 cached positions (issue 15, quiet machine, the same process). The first
call in a fresh clone compiles it (~2-6 s, then cached beside the module). torch.compile and
ONNX Runtime (a compile or an export in every fresh process, a second runtime to install) were
not taken. threadpoolctl: OpenBLAS starts one thread per core, and two threads on products this
small were ~3x slower on the shared machine, so decoding runs BLAS at torch's thread count.

Sampling is one compiled call too (`fast_kernels.sample_token`, with the UTF-8 or grammar mask
as an argument): ~20 NumPy calls took ~60 us a token, ~8 % of a step. With it the single stream
went from 3.8x `generate` to 4.1-5.1x (benchmarks/results/decode.md and README; the ratio moves with
`generate`'s own speed on the shared machine).

A chat prompt starts with the same system prompt and template every time (~25 of ~95 tokens):
`prefill_row` copies the keys and values of the part a prompt shares with the last one instead
of running it again. Sampling noise (below) for the next tokens is drawn in the worker thread
while a row decodes (~33 us a token otherwise).

Speculative decoding (issue 15) was measured and not taken: a forward over 2-9 positions at once
(`prefill(..., start=)`, the verify step) costs ~1.9-4.3 compiled one-row steps, not "little
more than one" (OpenBLAS's sgemm packs every weight matrix on each call; the one-row step reads
it once), and prompt-lookup drafts agree with the sampled token too rarely (free: ~1.1 tokens a
verify step) to pay for that: modeled 0.95x free, 0.93x guaranteed-valid (slower), replayed in
benchmarks/bench_decode.py (before the compiled step: ~1.07x and ~1.2x).

`decode` runs many rows at once (several samples of one prompt, many prompts), each with its own
position, seed and optional xgrammar matcher (guaranteed-valid mode), refilling a finished row's
slot with the next waiting prompt. Sampling follows transformers: grammar and UTF-8 masks, then
temperature, top-k, top-p, softmax and one exponential draw per vocabulary entry from a torch
generator seeded per row (what `torch.multinomial` does for one sample; `_Noise`), so a row's answer
depends on its prompt and seed only, not on the rows beside it. Top-p and the draw work on the
tokens top-k kept (the rest have probability 0), not on a sort of the whole vocabulary.

Guaranteed-valid mode: xgrammar's mask for step t+1 is filled in a worker thread while the main
thread runs step t+1's forward pass (both release the GIL), so with a free core the grammar costs
no wall time; its CPU cost stays (measured: median 5 us a token, but 2-3.5 ms at bar starts,
where the request grammar's bar-filling rules branch; mean ~0.5 ms). A single row then computes
only the allowed tokens' logits (median ~100 of 2,048), reading those rows of the LM head, and
samples among them (`sample_row(..., ids)`: the same token as from the whole masked row; the
ids come from xgrammar's bitmask and the UTF-8 row in one compiled pass, `fast_kernels.mask_ids`).
On one core there is no worker: the mask is filled after the step, on the main thread.

Same tokens as `generate` in practice, not bit for bit: the logits agree to ~1e-5 (the
summation order differs from torch's, and the compiled step's from OpenBLAS's), so a token can
differ only where two choices are that close. tests/test_fast_decode.py checks greedy and
seeded tokens against `generate`, batched rows against single ones, and grammar answers for
validity; the bench counts same-text answers.

    lean = LeanLlama(model)
    [row] = decode(lean, [Row(prompt_ids, seed=0)], Sampling(0.6, 0.95, 50, 256), stop_ids)
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from imelodist_lib.fast_kernels import mask_ids, rows_dot, rows_step, sample_token

NEG_INF = np.float32(-np.inf)
MIN_REUSED = 8  # prefill_row reuses a shared start of at least this many tokens


@dataclass(frozen=True)
class Sampling:
    """How every row picks its next token (temperature 0: greedy)."""

    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int


@dataclass
class Row:
    """One answer to make: the prompt's token ids, its seed and (guaranteed-valid) its grammar."""

    prompt: list[int]
    seed: int = 0
    grammar: Any = None  # an xgrammar CompiledGrammar, or None for free decoding
    max_new_tokens: int | None = None  # this row's own limit (None: the call's)


@dataclass
class RowResult:
    """What one row produced: new tokens (with the stop token when it stopped) and its timing."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop": a stop token; "length": hit max_new_tokens
    first_token_seconds: float | None = None  # from the start of the call to this row's first logits


def supports(model) -> str | None:
    """None when `LeanLlama` reproduces this model exactly, else why it does not."""
    config = getattr(model, "config", None)
    if type(model).__name__ != "LlamaForCausalLM" or config is None:
        return f"{type(model).__name__} is not a LlamaForCausalLM"
    if next(model.parameters()).device.type != "cpu" or next(model.parameters()).dtype != torch.float32:
        return "the lean path is for float32 models on the CPU"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return "scaled RoPE is not implemented in the lean path"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False) \
            or config.hidden_act != "silu" or getattr(model, "hf_device_map", None) \
            or getattr(config, "pretraining_tp", 1) != 1:
        return "biases, other activations, tensor-parallel slicing or device maps are not implemented"
    return None


@lru_cache(maxsize=1)
def _blas() -> Any:
    """threadpoolctl's handle on NumPy's BLAS (found once: ~30 ms)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def blas_threads(count: int):
    """A context in which NumPy's BLAS uses `count` threads (restored after)."""
    return _blas().limit(limits=count, user_api="blas")


class LeanLlama:
    """A `LlamaForCausalLM`'s weights as NumPy arrays, with a prefill and a one-token step.

    A cache (`new_cache`) holds per layer one array (rows, length, 2 * kv_size): each position's
    keys then values, so a step writes them in one copy; attention reads them as strided views
    (one row and the prefill: one matrix product per key head for the scores, one for the values;
    many rows: each row's queries as a (heads, kv_size) block, zero outside each head's key head,
    two products a row: measured faster than per-head products at 16 rows)."""

    def __init__(self, model):
        why = supports(model)
        if why:
            raise ValueError(f"LeanLlama cannot run this model: {why}; use model.generate")
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden, self.eps = config.hidden_size, config.rms_norm_eps
        self.vocab_size = config.vocab_size
        self.rotary = model.model.rotary_emb  # the model's own cos/sin, so RoPE matches exactly
        self.source = model
        self._version = self._weights_version()
        with torch.no_grad():
            self._read_weights(model)
        self._cos = self._sin = np.empty((0, self.qk_size), np.float32)
        self._last_prompt: tuple[list[int], np.ndarray] = ([], np.empty(0, np.float32))  # prefill_row's

    def _weights_version(self) -> tuple:
        """Changes when any weight of the source model is changed in place or replaced."""
        return tuple((p.data_ptr(), p._version) for p in self.source.parameters())

    def stale(self) -> bool:
        """True when the source model's weights changed since they were read (e.g. more training)."""
        return self._weights_version() != self._version

    def _read_weights(self, model) -> None:
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qk_size = self.q_size + self.kv_size
        self.group = self.heads // self.kv_heads
        self.embed = model.model.embed_tokens.weight.detach().numpy().astype(np.float32, copy=True)

        def normed(norm, *weights) -> np.ndarray:
            """W.T of the projections after an RMSNorm, its weight folded in: x @ W.T is one
            vector-matrix product, NumPy's fastest form here."""
            return np.ascontiguousarray((torch.cat(weights).t() * norm.weight[:, None]).numpy())

        scale = self.head_dim ** -0.5  # attention's 1/sqrt(head_dim) on q, folded into q's rows
        qkv, o, gate_up, down = [], [], [], []
        for layer in model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            qkv.append(normed(layer.input_layernorm, att.q_proj.weight * scale, att.k_proj.weight, att.v_proj.weight))
            o.append(att.o_proj.weight.t().numpy())
            # gate's rows and down's columns negated: silu(g) * u @ D == (-g / (1 + exp(-g))) * u @ -D,
            # one op fewer a layer (negation is exact)
            gate_up.append(normed(layer.post_attention_layernorm, -mlp.gate_proj.weight, mlp.up_proj.weight))
            down.append((-mlp.down_proj.weight).t().numpy())
        # one array per kind, layers stacked (what `fast_kernels.rows_step` reads); self.layers: views
        self.qkv_t, self.o_t, self.gate_up_t, self.down_t = (np.ascontiguousarray(np.stack(w), np.float32)
                                                             for w in (qkv, o, gate_up, down))
        self.layers = list(zip(self.qkv_t, self.o_t, self.gate_up_t, self.down_t))
        self.lm_head_t = normed(model.model.norm, model.lm_head.weight)
        self.lm_rows = np.ascontiguousarray(self.lm_head_t.T)  # (V, hidden): a few tokens' logits
        self.intermediate = self.down_t.shape[1]

    def rope_table(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and signed sin for positions 0..length-1 (at least), tiled over the q and k heads:
        (positions, q+k) each. rotate_half(x) * sin == flip(x by halves) * signed_sin, so RoPE
        is a flip and two products."""
        if self._cos.shape[0] < length:
            positions = torch.arange(max(length, 2 * self._cos.shape[0], 256))[None]
            cos, sin = self.rotary(torch.zeros(1, dtype=torch.float32), positions)
            half = self.head_dim // 2
            sign = torch.cat([-torch.ones(half), torch.ones(half)])
            tiles = self.heads + self.kv_heads
            self._cos = np.ascontiguousarray(cos[0].repeat(1, tiles).numpy())
            self._sin = np.ascontiguousarray((sin[0] * sign).repeat(1, tiles).numpy())
        return self._cos, self._sin

    def _rope_(self, qk: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
        """RoPE in place on the q and k columns of a projection (..., q+k), as transformers
        computes it; cos and sin (..., q+k) from `rope_table`."""
        half = self.head_dim // 2
        pairs = qk.reshape(*qk.shape[:-1], -1, 2, half)
        turned = pairs[..., ::-1, :] * sin.reshape(pairs.shape)
        qk *= cos
        pairs += turned

    def _mlp_(self, x: np.ndarray, gu_t: np.ndarray, down_t: np.ndarray, unit: np.ndarray) -> None:
        """x += the SwiGLU block, from unit = x / rms(x) (gate and down stored negated)."""
        gate_up = unit @ gu_t
        minus_gate = gate_up[..., :self.intermediate]
        h = np.exp(minus_gate)  # inf for gate < -88: silu is then -0, as it should be
        h += 1
        np.divide(minus_gate, h, out=h)
        h *= gate_up[..., self.intermediate:]
        x += h @ down_t

    def _unit_rms(self, x: np.ndarray) -> np.ndarray:
        """x / rms(x) per row: RMSNorm without its weight (folded into the next projection)."""
        if x.ndim == 1:
            return x * np.float32(1.0 / math.sqrt(float(x @ x) / x.shape[0] + self.eps))
        return x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(self.eps)))

    def new_cache(self, rows: int, length: int) -> np.ndarray:
        """Keys then values of each position, layers stacked: (layers, rows, length, 2 * kv_size);
        cache[layer] is one layer's (rows, length, 2 * kv_size)."""
        return np.zeros((len(self.layers), rows, length, 2 * self.kv_size), np.float32)

    def _heads(self, cached: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Views of cached positions (..., length, 2 * kv_size) per key head: keys transposed
        (..., kv_heads, head_dim, length) and values (..., kv_heads, length, head_dim)."""
        *rows, length, _ = cached.shape
        split = cached.reshape(*rows, length, 2, self.kv_heads, self.head_dim)
        n = len(rows)  # split[..., i, :, :] is (*rows, length, kv_heads, head_dim)
        lead = tuple(range(n))
        return (split[..., 0, :, :].transpose(*lead, n + 1, n + 2, n),
                split[..., 1, :, :].transpose(*lead, n + 1, n, n + 2))

    def prefill(self, tokens: list[int], cache, row: int, all_logits: bool = False, start: int = 0,
                head: bool = True) -> np.ndarray:
        """Run tokens at positions start.. into cache row `row` (attending to the cache's first
        `start` positions too); the last position's logits (V,) (or every position's, (S, V), with
        all_logits; head=False: the final normed hidden states, for `logits`). start > 0 is what a
        speculative verify step would run (2-9 positions cost ~1.9-4.3 one-row steps: the module
        docstring; benchmarks/bench_decode.py's study) and what `prefill_row` runs after a
        prompt's reused start."""
        n, kvh, hd = len(tokens), self.kv_heads, self.head_dim
        end = start + n
        cos, sin = (t[start:end] for t in self.rope_table(end))
        causal = np.triu(np.full((n, end), NEG_INF), start + 1)
        x = self.embed[np.asarray(tokens)]
        with np.errstate(over="ignore"):
            for (qkv_t, o_t, gu_t, down_t), layer_cache in zip(self.layers, cache):
                out = self._unit_rms(x) @ qkv_t
                self._rope_(out[:, :self.qk_size], cos, sin)
                cached = layer_cache[row, :end]
                cached[start:] = out[:, self.q_size:]
                q = out[:, :self.q_size].reshape(n, kvh, self.group, hd).transpose(1, 2, 0, 3)  # (kvh, g, n, hd)
                keys, values = self._heads(cached)
                scores = q @ keys[:, None]
                scores += causal
                att = _softmax_(scores, -1) @ values[:, None]  # (kvh, g, n, hd)
                x += att.transpose(2, 0, 1, 3).reshape(n, self.q_size) @ o_t
                self._mlp_(x, gu_t, down_t, self._unit_rms(x))
        x = x if all_logits else x[-1]
        return self._unit_rms(x) @ self.lm_head_t if head else self._unit_rms(x)

    def prefill_row(self, tokens: list[int], cache, row: int) -> np.ndarray:
        """`prefill` of a prompt into cache row `row`, reusing the keys and values of the part it
        shares with the last prompt prefilled this way (every chat starts with the same system
        prompt and template: ~25 of ~95 tokens). The last position's logits (V,)."""
        tokens = list(tokens)
        kept_tokens, kept = self._last_prompt
        common = 0
        for a, b in zip(tokens, kept_tokens):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)  # the last position always runs, for its logits
        if common >= MIN_REUSED:
            cache[:, row, :common] = kept[:, :common]
            logits = self.prefill(tokens[common:], cache, row, start=common)
        else:
            logits = self.prefill(tokens, cache, row)
        self._last_prompt = (tokens, cache[:, row, :len(tokens)].copy())
        return logits

    def step(self, tokens, positions, cache, head: bool = True) -> np.ndarray:
        """One new token per cache row (tokens, positions: (B,) ints), row b attending to its own
        positions 0..positions[b], as one compiled call (`fast_kernels.rows_step`: the weights read
        once for every row). Returns logits (B, V), or with head=False the final normed hidden
        states (B, H) for `logits`."""
        tokens = np.ascontiguousarray(tokens, np.int64)
        positions = np.ascontiguousarray(positions, np.int64)
        cos, sin = self.rope_table(int(positions.max()) + 1)
        out = np.empty((tokens.shape[0], self.vocab_size if head else self.hidden), np.float32)
        rows_step(tokens, positions, self.embed, self.qkv_t, self.o_t, self.gate_up_t, self.down_t,
                  self.lm_head_t, cache, cos, sin, self.eps, self.heads, self.kv_heads, self.head_dim,
                  head, out)
        return out

    def logits(self, unit: np.ndarray, tokens: np.ndarray | None = None) -> np.ndarray:
        """The LM head on a final normed hidden state (`_step_one(..., head=False)`): every
        token's logit, or only `tokens`' (reading their rows of the head, not all 2 MB of it)."""
        if tokens is None:
            return unit @ self.lm_head_t
        out = np.empty(len(tokens), np.float32)
        rows_dot(self.lm_rows, np.asarray(tokens, np.int64), unit, out)
        return out

    def _step_one(self, token: int, position: int, cache, head: bool = True) -> np.ndarray:
        """`step` for a single row (cache row 0) at `position`: logits (V,), or with head=False
        the final normed hidden state for `logits`."""
        return self.step(np.array([token]), np.array([position]), cache[:, :1], head)[0]


def _softmax_(scores: np.ndarray, axis: int) -> np.ndarray:
    """Softmax along `axis`, in place."""
    scores -= scores.max(axis, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis, keepdims=True)
    return scores


def sample_row(scores: np.ndarray, sampling: Sampling, noise: np.ndarray,
               ids: np.ndarray | None = None, allowed: np.ndarray | None = None) -> int:
    """One token from one row's logits (V,), as transformers samples it: temperature, top-k
    (ties at the k-th value kept), top-p (the smallest-probability tokens whose total is at most
    1 - top_p dropped, the most probable always kept), then argmax(probs / noise) with noise ~
    Exp(1) per vocabulary entry (torch.multinomial's draw). Tokens top-k drops have probability
    0, so top-p and the draw only look at those it keeps. One compiled call
    (`fast_kernels.sample_token`: ~10 us where ~20 NumPy calls took ~60 us).

    `allowed` (V,) bools: only those tokens (a grammar's or the UTF-8 automaton's mask), as if
    the others' logits were -inf. `ids` (ascending token ids): `scores` holds only those
    tokens' logits, every other token being masked, as a grammar masks; the same token comes
    out as from the whole masked row (the k-th largest, the kept order and argmax's ties are the
    same), from ~100 values instead of the vocabulary."""
    token = sample_token(scores, _NO_BOOLS if allowed is None else allowed,
                         _NO_IDS if ids is None else ids, np.float32(sampling.temperature),
                         sampling.top_k or 0,
                         np.float32(1 - sampling.top_p) if sampling.top_p < 1.0 else np.float32(-1.0), noise)
    if token < 0:
        raise ValueError("no token is allowed: the mask forbids every one")
    return int(token)


_NO_BOOLS, _NO_IDS = np.empty(0, np.bool_), np.empty(0, np.int64)


@lru_cache(maxsize=1)
def _worker() -> ThreadPoolExecutor:
    """One thread that fills grammar masks and draws sampling noise while the main thread runs
    the model step (xgrammar's and torch's calls release the GIL, as the compiled step does)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="fast_decode-worker")


class _Noise:
    """A row's Exp(1) draws for `sample_row`, one vocabulary's worth a token, from its seeded
    generator: what `torch.empty(V).exponential_(generator)` gives token after token (torch 2.13
    draws the same numbers for one (k*V,) tensor as for k (V,) tensors in turn; the seeded tests
    against `generate` check it). With a worker thread, the next `ahead` tokens' draws are made
    there while this row decodes (~33 us a token on the main thread otherwise)."""

    def __init__(self, seed: int, vocab: int, worker: ThreadPoolExecutor | None, ahead: int = 8):
        self.generator = torch.Generator().manual_seed(seed)
        self.vocab, self.worker = vocab, worker
        self.ahead = ahead if worker is not None else 1
        self.block, self.used = np.empty((0, vocab), np.float32), 0
        self.coming = self._submit()

    def _draw(self) -> np.ndarray:
        return torch.empty(self.ahead, self.vocab).exponential_(generator=self.generator).numpy()

    def _submit(self):
        return self.worker.submit(self._draw) if self.worker is not None else None

    def next(self) -> np.ndarray:
        """The next token's (V,) draws."""
        if self.used == len(self.block):
            self.block = self.coming.result() if self.coming is not None else self._draw()
            self.used, self.coming = 0, self._submit()
        self.used += 1
        return self.block[self.used - 1]


class _Slots:
    """The rows being decoded now: cache rows, positions, last tokens, noise, matchers."""

    def __init__(self, lean: LeanLlama, count: int, length: int, constrained: bool):
        self.lean, self.length = lean, length
        self.cache = lean.new_cache(count, length)
        self.row_of = [-1] * count  # which Row each slot holds (-1: free)
        self.positions = [0] * count  # where the slot's next token goes
        self.tokens = [0] * count
        self.noises: list[_Noise | None] = [None] * count
        self.matchers: list[Any] = [None] * count
        self.utf8_states = [0] * count  # imelodist_lib.utf8 automaton state per slot (0: boundary)
        self.bitmask = None
        if constrained:
            import xgrammar as xgr

            self.bitmask = xgr.allocate_token_bitmask(count, lean.vocab_size)

    def compact(self) -> None:
        """Drop free slots from the cache (rows left after the queue ran dry)."""
        keep = [i for i, r in enumerate(self.row_of) if r >= 0]
        self.cache = self.cache[:, keep]
        for name in ("row_of", "positions", "tokens", "noises", "matchers", "utf8_states"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in keep])
        if self.bitmask is not None:
            self.bitmask = self.bitmask[:len(keep)].contiguous()


def iter_decode(lean: LeanLlama, rows: list[Row], sampling: Sampling, stop_ids: list[int],
                batch_size: int = 16, results: list[RowResult] | None = None,
                utf8=None) -> Iterator[tuple[int, int]]:
    """Decode `rows` up to `batch_size` at a time; yield (row index, token) as tokens are made.

    `utf8` (an `imelodist_lib.utf8.Utf8Table`): only tokens that keep each answer valid UTF-8,
    masked after the grammar, as `utf8.Utf8LogitsProcessor` does on the generate path.

    `results` (a list) receives one RowResult per row, in order. Rows with the same prompt share
    one prefill. A finished row's slot takes the next waiting row; when none waits, finished
    slots are dropped from the batch once half of it is free. NumPy's BLAS runs at torch's
    thread count (`torch.set_num_threads`) while decoding."""
    import xgrammar as xgr

    start = time.perf_counter()
    results = [] if results is None else results
    results[:] = [RowResult() for _ in rows]
    if not rows:
        return
    constrained = any(r.grammar is not None for r in rows)
    if constrained and not all(r.grammar is not None for r in rows):
        raise ValueError("a batch is either all guaranteed-valid or all free: split it by mode")
    if any(r.max_new_tokens is not None and r.max_new_tokens < 1 for r in rows) or sampling.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    limits = [r.max_new_tokens or sampling.max_new_tokens for r in rows]
    length = max(len(r.prompt) + limit for r, limit in zip(rows, limits))
    slots = _Slots(lean, min(batch_size, len(rows)), length, constrained)
    waiting = list(range(len(rows)))[::-1]
    stops = set(stop_ids)
    vocab = lean.vocab_size
    utf8_allowed = None if utf8 is None else utf8.allowed[:, :vocab].numpy()
    utf8_next = None if utf8 is None else utf8.next_state.numpy()
    every_word = np.full((vocab + 31) // 32, -1, np.int32)  # a bitmask row allowing every token
    prefilled: tuple | None = None  # (prompt, cache row, logits) of the last prefill, for reuse
    worker = _worker() if len(os.sched_getaffinity(0)) > 1 else None

    def admit(slot: int) -> np.ndarray:
        """Put the next waiting row into `slot`; return its first logits."""
        nonlocal prefilled
        index = waiting.pop()
        row = rows[index]
        n = len(row.prompt)
        if prefilled is not None and prefilled[0] == row.prompt and slots.row_of[prefilled[1]] >= 0:
            source = prefilled[1]
            for layer in slots.cache:
                layer[slot, :n] = layer[source, :n]
            logits = prefilled[2].copy()
        else:
            logits = lean.prefill_row(row.prompt, slots.cache, slot)
            prefilled = (row.prompt, slot, logits.copy())
        slots.row_of[slot], slots.positions[slot] = index, n
        slots.noises[slot] = _Noise(row.seed, vocab, worker if sampling.temperature > 0 else None)
        slots.matchers[slot] = xgr.GrammarMatcher(row.grammar) if constrained else None
        slots.utf8_states[slot] = 0
        results[index].first_token_seconds = time.perf_counter() - start
        return logits

    def fill(live: list[int]) -> list[bool]:
        """Each live slot's grammar mask into bitmask row i (True: it forbids something)."""
        return [slots.matchers[slot].fill_next_token_bitmask(slots.bitmask, i) for i, slot in enumerate(live)]

    def filled(live: list[int], filling) -> list[bool] | None:
        """`fill`'s answer: from the worker thread where it ran during the step, else here
        (one core: after the step); None in free decoding."""
        if not constrained:
            return None
        return filling.result() if filling is not None else fill(live)

    def allowed_tokens(live: list[int], need: list[bool] | None) -> np.ndarray | None:
        """(len(live), V) bools: what the grammar (bitmask filled, `need` from `fill`) and the
        UTF-8 automaton allow each slot next; None when both allow everything."""
        allowed = None
        if need is not None and any(need):  # xgrammar's bits, token t at bit t % 32 of word t // 32
            words = slots.bitmask[:len(live)].numpy()
            allowed = np.unpackbits(words.view(np.uint8), axis=1, count=vocab, bitorder="little").view(bool)
        if utf8_allowed is not None:
            if allowed is None and len(live) == 1:  # a view of the state's row, not a copy
                return utf8_allowed[slots.utf8_states[live[0]]][None]
            by_state = utf8_allowed[[slots.utf8_states[s] for s in live]]
            allowed = by_state if allowed is None else allowed & by_state
        return allowed

    def choose(logits: np.ndarray, live: list[int], allowed: np.ndarray | None,
               ids: np.ndarray | None = None) -> list[int]:
        """The next token of each slot in `live` (logits: (len(live), V), changed in place; or,
        for one row with `ids`, (1, len(ids)): only the allowed tokens' logits, ascending ids)."""
        if ids is not None:
            if sampling.temperature <= 0:
                return [int(ids[int(logits[0].argmax())])]
            return [sample_row(logits[0], sampling, slots.noises[live[0]].next(), ids)]
        if sampling.temperature <= 0:
            if allowed is not None:
                logits[~allowed] = NEG_INF
            return logits.argmax(-1).tolist()
        return [sample_row(logits[i], sampling, slots.noises[slot].next(),
                           allowed=None if allowed is None else allowed[i]) for i, slot in enumerate(live)]

    def record(slot: int, token: int) -> bool:
        """Note a slot's new token; True when the row is finished."""
        index = slots.row_of[slot]
        result = results[index]
        result.tokens.append(token)
        if constrained and not slots.matchers[slot].accept_token(token):
            raise RuntimeError(f"the grammar matcher refused token {token} it allowed: an xgrammar bug")
        if utf8_next is not None:
            slots.utf8_states[slot] = max(0, int(utf8_next[slots.utf8_states[slot], token]))
        if token in stops:
            result.finish_reason = "stop"
            return True
        if len(result.tokens) >= limits[index]:
            return True
        slots.tokens[slot] = token
        return False

    with blas_threads(torch.get_num_threads()):
        pending: list[tuple[int, np.ndarray]] = []  # slots whose first logits wait for a token
        for slot in range(len(slots.row_of)):
            pending.append((slot, admit(slot)))
        while True:
            # first tokens of newly admitted rows come from their prefill logits
            while pending:
                live = [s for s, _ in pending]
                allowed = allowed_tokens(live, fill(live) if constrained else None)
                tokens = choose(np.stack([l for _, l in pending]), live, allowed)
                pending = []
                for slot, token in zip(live, tokens):
                    yield slots.row_of[slot], token
                    if record(slot, token):
                        slots.row_of[slot] = -1
                        if waiting:
                            pending.append((slot, admit(slot)))
            live = [s for s, r in enumerate(slots.row_of) if r >= 0]
            if not live:
                return
            if not waiting and len(live) <= len(slots.row_of) // 2:
                slots.compact()
                live = list(range(len(slots.row_of)))
            filling = worker.submit(fill, live) if worker and constrained else None  # runs during the step
            ids = None  # one grammar row: its allowed token ids, whose logits alone are computed
            if constrained and len(slots.row_of) == 1:
                unit = lean._step_one(slots.tokens[0], slots.positions[0], slots.cache, head=False)
                need = filled(live, filling)
                if need[0] or utf8_allowed is not None:
                    # only the allowed tokens' logits: a few rows of the LM head, sampled among themselves
                    ids = mask_ids(slots.bitmask[0].numpy() if need[0] else every_word, _NO_BOOLS
                                   if utf8_allowed is None else utf8_allowed[slots.utf8_states[0]], vocab)
                logits, allowed = lean.logits(unit, ids)[None], None
            else:
                logits = lean.step(np.array(slots.tokens), np.array(slots.positions), slots.cache)
                logits = logits[live] if len(live) < len(slots.row_of) else logits
                allowed = allowed_tokens(live, filled(live, filling))
            tokens = choose(logits, live, allowed, ids)
            for slot, token in zip(live, tokens):
                slots.positions[slot] += 1
                yield slots.row_of[slot], token
                if record(slot, token):
                    slots.row_of[slot] = -1
                    if waiting:
                        pending.append((slot, admit(slot)))
            for s in range(len(slots.row_of)):  # a free slot writes harmlessly where it stopped
                if slots.row_of[s] < 0:
                    slots.positions[s] = min(slots.positions[s], length - 1)


def decode(lean: LeanLlama, rows: list[Row], sampling: Sampling, stop_ids: list[int],
           batch_size: int = 16, utf8=None) -> list[RowResult]:
    """Decode every row (see `iter_decode`); one RowResult per row, in order."""
    results: list[RowResult] = []
    for _ in iter_decode(lean, rows, sampling, stop_ids, batch_size, results, utf8):
        pass
    return results
