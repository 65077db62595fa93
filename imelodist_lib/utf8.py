"""Text that is always text: a decoding-time mask that admits only tokens continuing valid UTF-8.

IMelodist-tiny's tokenizer is a byte-level BPE of 2,048 tokens. Measured on the knowledge corpus
(`knowledge.load_knowledge()`, 32,613 Han characters, 1,475 distinct): only 144 distinct
characters (10 %) are one token, covering 64.5 % of the occurrences; the other 90 % are spelled
in two or three byte tokens, and a 5M model writes byte sequences that are not UTF-8 (answers
with replacement characters). A tokenizer that keeps Chinese characters whole would need about
1,200 more tokens for 99 % of the occurrences (1,475 for all; 525 for 90 %): +59 % vocabulary,
and a model and tokenizer retrained from zero. This mask costs nothing at training time and one
table lookup per decoded token, so it is the fix here (`python -m imelodist_lib.utf8` prints
the figures again).

How: a UTF-8 validator is a small automaton (RFC 3629: a lead byte, then 1-3 continuation bytes,
with narrower ranges after E0, ED, F0 and F4 so that no overlong form or surrogate gets through).
Each token's bytes are run through it once, from every state, giving a table
`next_state[state, token]` (-1: the token would make the text invalid). Decoding keeps one state
per sequence; the allowed tokens are `next_state[state] >= 0`. Special tokens (`<|im_end|>`...)
are allowed only at a character boundary. Byte-level BPE tokens map back to bytes through the
GPT-2 byte<->unicode table; SentencePiece byte-fallback tokens `<0xNN>` (InternLM2) are bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import torch

# Automaton states. BOUNDARY: between characters. NEED1..NEED3: that many continuation bytes
# (80-BF) to go. The four "first continuation" states narrow the next byte's range.
BOUNDARY, NEED1, NEED2, NEED3, AFTER_E0, AFTER_ED, AFTER_F0, AFTER_F4 = range(8)
N_STATES = 8
INVALID = -1
_FIRST_CONT = {AFTER_E0: (0xA0, 0xBF, NEED1), AFTER_ED: (0x80, 0x9F, NEED1),
               AFTER_F0: (0x90, 0xBF, NEED2), AFTER_F4: (0x80, 0x8F, NEED2)}


def step_byte(state: int, byte: int) -> int:
    """The automaton's next state after one byte (INVALID when the byte breaks UTF-8)."""
    if state == INVALID:
        return INVALID
    if state == BOUNDARY:
        if byte < 0x80:
            return BOUNDARY
        if 0xC2 <= byte <= 0xDF:
            return NEED1
        if byte == 0xE0:
            return AFTER_E0
        if byte == 0xED:
            return AFTER_ED
        if 0xE1 <= byte <= 0xEF:
            return NEED2
        if byte == 0xF0:
            return AFTER_F0
        if byte == 0xF4:
            return AFTER_F4
        if 0xF1 <= byte <= 0xF3:
            return NEED3
        return INVALID  # 80-C1 (a stray continuation, overlong leads) and F5-FF never start a character
    if state in _FIRST_CONT:
        lo, hi, then = _FIRST_CONT[state]
        return then if lo <= byte <= hi else INVALID
    if 0x80 <= byte <= 0xBF:
        return {NEED1: BOUNDARY, NEED2: NEED1, NEED3: NEED2}[state]
    return INVALID


def step_bytes(state: int, data: bytes) -> int:
    """The state after a run of bytes (INVALID as soon as one breaks UTF-8)."""
    for b in data:
        state = step_byte(state, b)
        if state == INVALID:
            break
    return state


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode stand-in for each byte, inverted (char -> byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_sentencepiece(vocab: dict[str, int]) -> bool:
    return "<0x00>" in vocab and "<0xFF>" in vocab


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes each token id writes (None for special tokens, which write no text).
    Byte-level BPE: the token string through the byte<->unicode table; SentencePiece:
    `<0xNN>` is one byte, `▁` a space, anything else its UTF-8."""
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    special = set(tokenizer.all_special_ids)
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    spm = _is_sentencepiece(vocab)
    decoder = _byte_decoder()
    out: list[bytes | None] = [None] * size
    for token, i in vocab.items():
        if i in special:
            continue
        if i in added:
            out[i] = added[i].encode("utf-8")
        elif spm:
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                out[i] = bytes([int(token[3:5], 16)])
            else:
                out[i] = token.replace("\u2581", " ").encode("utf-8")
        elif all(c in decoder for c in token):
            out[i] = bytes(decoder[c] for c in token)
        else:  # a token outside the byte alphabet (an unusual added token): its text
            out[i] = token.encode("utf-8")
    return out


@dataclass(frozen=True)
class Utf8Table:
    """next_state[state, token] (INVALID: not allowed) and the matching bool mask, one row per state."""

    next_state: torch.Tensor  # long [N_STATES, vocab]
    allowed: torch.Tensor  # bool [N_STATES, vocab]
    token_bytes: tuple[bytes | None, ...]

    @property
    def vocab_size(self) -> int:
        return self.next_state.shape[1]


def build_table(tokenizer: Any, vocab_size: int | None = None) -> Utf8Table:
    """The per-token transition table for `tokenizer`, padded to `vocab_size` (a model's
    embedding rows may outnumber the tokenizer's ids; the extra rows are never allowed)."""
    pieces = token_bytes(tokenizer)
    size = max(len(pieces), vocab_size or 0)
    table = torch.full((N_STATES, size), INVALID, dtype=torch.long)
    for i, data in enumerate(pieces):
        for s in range(N_STATES):
            if data is None:  # special: only between characters, and it leaves us there
                table[s, i] = BOUNDARY if s == BOUNDARY else INVALID
            elif data:
                table[s, i] = step_bytes(s, data)
    return Utf8Table(table, table >= 0, tuple(pieces))


def allowed_mask(table: Utf8Table, states: torch.Tensor) -> torch.Tensor:
    """bool [batch, vocab]: the tokens each sequence may write next (states: long [batch])."""
    return table.allowed[states]


def advance(table: Utf8Table, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The states after each sequence writes its token (one table lookup)."""
    return table.next_state[states, tokens]


class Utf8LogitsProcessor:
    """transformers LogitsProcessor: tokens that would break UTF-8 get -inf.

    Keeps one automaton state per row, advanced by the newest token each call (O(1) per step);
    the prompt is taken to end between characters. For sampling and greedy search (rows keep
    their order); when the rows' length does not grow by one, the states are rebuilt from the
    generated tokens. Use it as `model.generate(..., logits_processor=LogitsProcessorList([p]))`.
    """

    def __init__(self, tokenizer: Any, vocab_size: int | None = None, table: Utf8Table | None = None):
        self.table = table or build_table(tokenizer, vocab_size)
        self._prompt_len: int | None = None
        self._states: torch.Tensor | None = None
        self._seen = 0

    def reset(self) -> None:
        """Forget the current generation (call before reusing the processor on a new prompt)."""
        self._prompt_len, self._states, self._seen = None, None, 0

    def _sync(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        if self._prompt_len is None or self._states is None or self._states.shape[0] != batch \
                or length < self._seen or length < self._prompt_len:
            if self._prompt_len is None or length < self._prompt_len:
                self._prompt_len = length
            self._states = torch.full((batch,), BOUNDARY, dtype=torch.long)
            self._seen = self._prompt_len
        ids = input_ids.to("cpu")
        for pos in range(self._seen, length):  # one step normally; a rebuild replays the answer
            self._states = advance(self.table, self._states, ids[:, pos]).clamp_min(BOUNDARY)
        self._seen = length
        return self._states

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        states = self._sync(input_ids)
        mask = allowed_mask(self.table, states)[:, : scores.shape[-1]].to(scores.device)
        return scores.masked_fill(~mask, float("-inf"))


def answer_bytes(table: Utf8Table, ids: Sequence[int]) -> bytes:
    """The raw bytes a run of token ids writes (special tokens write none)."""
    return b"".join(table.token_bytes[i] or b"" for i in ids if i < len(table.token_bytes))


def trailing_incomplete(data: bytes) -> int:
    """How many bytes at the end start a character that is not finished yet (0-3), e.g. an
    answer cut by max_new_tokens in the middle of a character; they are not an invalid sequence."""
    for k in range(1, min(3, len(data)) + 1):
        state = step_bytes(BOUNDARY, data[-k:])
        if state not in (INVALID, BOUNDARY) and 0xC2 <= data[-k] <= 0xF4:
            return k
    return 0


def is_valid_utf8(data: bytes, allow_cut: bool = True) -> bool:
    """Strict UTF-8 check (`bytes.decode('utf-8', errors='strict')`); with `allow_cut`, an
    unfinished last character (a length cut) does not count as invalid."""
    if allow_cut:
        data = data[: len(data) - trailing_incomplete(data)]
    try:
        data.decode("utf-8", errors="strict")
        return True
    except UnicodeDecodeError:
        return False


def han_token_figures(tokenizer: Any, texts: Sequence[str]) -> dict[str, float]:
    """How the tokenizer spells the Han characters of `texts`: distinct characters, how many are
    one token, the share of occurrences that are, and how many whole-character tokens would
    cover 90/99/100 % of occurrences."""
    import re
    from collections import Counter

    han = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
    counts = Counter(c for t in texts for c in t if han.match(c))
    total = sum(counts.values())
    single = {c for c in counts if len(tokenizer(c, add_special_tokens=False)["input_ids"]) == 1}
    out: dict[str, float] = {"han_occurrences": total, "distinct": len(counts),
                             "distinct_single_token": len(single),
                             "occurrence_share_single_token": sum(counts[c] for c in single) / max(total, 1)}
    acc, ranked = 0, counts.most_common()
    for share in (0.9, 0.99, 1.0):
        acc, n = 0, 0
        for _, k in ranked:
            acc, n = acc + k, n + 1
            if acc >= share * total:
                break
        out[f"chars_for_{int(share * 100)}pct"] = n
    return out


if __name__ == "__main__":
    import json

    from transformers import AutoTokenizer

    from imelodist_lib.knowledge import load_knowledge
    from imelodist_lib.profiles import SHIPPED_MODEL_DIR

    print(json.dumps(han_token_figures(AutoTokenizer.from_pretrained(SHIPPED_MODEL_DIR), load_knowledge()),
                     indent=1))
