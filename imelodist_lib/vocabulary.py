"""Whole Chinese characters for a byte-level BPE model that spells them in bytes (issue 13, names).

IMelodist-tiny's 2,048-token vocabulary keeps 144 of the knowledge text's 1,479 Chinese
characters whole; every other one is two or three byte tokens, so a composer's Chinese name is a
dozen tokens a 5M model must learn in order. `whole_characters` appends BPE merges (byte pair,
then the pair with the third byte) so each chosen character is one token; existing merges keep
their ranks, so ABC and English tokenize exactly as before (tested). `grow_embeddings` gives the
model rows for the new tokens, each the mean of the rows of the pieces it replaces, so the
grown model starts out reading a character roughly as it read its bytes.

    python -m imelodist_lib.vocabulary --model data/models/imelodist-tiny --output runs/whole-chars
"""
from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

__all__ = ["han_characters", "whole_characters", "grow_embeddings"]


def han_characters(texts: Iterable[str]) -> list[str]:
    """The distinct CJK unified ideographs in `texts`, sorted."""
    return sorted({ch for text in texts for ch in text if "\u4e00" <= ch <= "\u9fff"})


@lru_cache(maxsize=1)
def _byte_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the printable character each byte is written as in the vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _spelled(text: str) -> str:
    return "".join(_byte_chars()[b] for b in text.encode("utf-8"))


def whole_characters(tokenizer: Any, chars: Iterable[str]) -> tuple[Any, dict[str, int]]:
    """A copy of `tokenizer` (a byte-level BPE PreTrainedTokenizerFast) in which each of `chars`
    that is not one token yet becomes one, and {character: new id} for them. New ids follow the
    old ones; the byte pairs needed on the way are added too (not in the dict)."""
    from transformers import AutoTokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or not isinstance(model.get("merges"), list):
        raise ValueError("whole_characters needs a byte-level BPE tokenizer (tokenizer.json model type BPE)")
    vocab, merges = model["vocab"], model["merges"]
    as_pair = (lambda a, b: [a, b]) if merges and isinstance(merges[0], list) else (lambda a, b: f"{a} {b}")
    next_id = max([*vocab.values(), *(t["id"] for t in spec.get("added_tokens", []))]) + 1
    added: dict[str, int] = {}
    for ch in chars:
        word = _spelled(ch)
        if word in vocab or len(word) < 2:
            continue
        for end in range(2, len(word) + 1):  # "ab" from a+b, then "abc" from ab+c
            if word[:end] not in vocab:
                vocab[word[:end]] = next_id
                merges.append(as_pair(word[:end - 1], word[end - 1]))
                next_id += 1
        added[ch] = vocab[word]
    with tempfile.TemporaryDirectory() as folder:  # the tokenizer's own files, its tokenizer.json replaced
        tokenizer.save_pretrained(folder)
        (Path(folder) / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        grown = AutoTokenizer.from_pretrained(folder)
    return grown, added


def grow_embeddings(model: Any, old_tokenizer: Any, new_tokenizer: Any) -> int:
    """Resize `model`'s (tied) embeddings to `new_tokenizer`'s vocabulary; each new token's row
    is the mean of the rows of the old tokens that spell it. Returns the number of new rows."""
    import torch

    old_size, new_size = model.get_input_embeddings().weight.shape[0], len(new_tokenizer)
    if new_size <= old_size:
        return 0
    if model.get_output_embeddings() is not None and not model.config.tie_word_embeddings:
        raise ValueError("grow_embeddings expects tied input and output embeddings (IMelodist-tiny's)")
    model.resize_token_embeddings(new_size, mean_resizing=False)
    weight = model.get_input_embeddings().weight
    by_id = {i: t for t, i in new_tokenizer.get_vocab().items()}
    decode = {v: k for k, v in _byte_chars().items()}
    with torch.no_grad():
        for new_id in range(old_size, new_size):
            try:
                text = bytes(decode[c] for c in by_id[new_id]).decode("utf-8")
                pieces = old_tokenizer.encode(text, add_special_tokens=False)
            except (KeyError, UnicodeDecodeError):  # a byte pair on the way to a character
                pieces = [old_tokenizer.convert_tokens_to_ids(c) for c in by_id[new_id]]
            weight[new_id] = weight[pieces].mean(0)
    return new_size - old_size


def main(argv: list[str] | None = None) -> int:
    """CLI: a model and tokenizer with the knowledge text's Chinese characters as whole tokens."""
    import argparse

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from imelodist_lib.knowledge import load_knowledge
    from imelodist_lib.models import save_model
    from imelodist_lib.profiles import KNOWLEDGE_DIR, SHIPPED_MODEL_DIR

    parser = argparse.ArgumentParser(prog="python -m imelodist_lib.vocabulary", description=main.__doc__)
    parser.add_argument("--model", default=str(SHIPPED_MODEL_DIR))
    parser.add_argument("--output", required=True)
    parser.add_argument("--knowledge-dir", default=str(KNOWLEDGE_DIR))
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    texts = load_knowledge(args.knowledge_dir)
    texts += [p.read_text(encoding="utf-8") for p in sorted(Path(args.knowledge_dir).glob("*.tsv"))]
    chars = han_characters(texts)
    grown, added = whole_characters(tokenizer, chars)
    rows = grow_embeddings(model, tokenizer, grown)
    save_model(model, grown, args.output)
    before = sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)
    after = sum(len(grown.encode(t, add_special_tokens=False)) for t in texts)
    print(json.dumps({"characters": len(chars), "already_whole": len(chars) - len(added),
                      "made_whole": len(added), "new_tokens": rows, "vocabulary": len(grown),
                      "knowledge_tokens_before": before, "knowledge_tokens_after": after}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
