"""Probes that ask a model questions and score its answers (issue 13, section 2).

`knowledge_probe`: does the model know who it is, composers' and works' names in Chinese and
English, and a few ABC facts? The questions use held-out phrasings
(`data/knowledge/probe_templates.json`), none of them in any training record
(`tests/test_probes.py` checks), so a right answer means the model recalls the fact, not a
sentence it saw. An answer is right when it contains an expected string (case-, space- and
punctuation-insensitive; a name without its parenthesis counts). Greedy decoding, so one run
is one measurement; rates come with Wilson intervals (`evaluation.wilson_interval`).

    python -m imelodist_lib.probes --model data/models/imelodist-tiny
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from imelodist_lib.evaluation import wilson_interval
from imelodist_lib.knowledge_chats import composer_values, fill, work_values
from imelodist_lib.profiles import KNOWLEDGE_DIR

PROBE_FILE = "probe_templates.json"
CATEGORIES = ("identity", "composer_names", "work_titles", "abc_facts")
TEMPLATE_KINDS = ("composer_to_zh", "composer_to_en", "work_to_zh", "work_to_en")


@dataclass(frozen=True)
class ProbeItem:
    """One question and the strings whose presence makes an answer right."""

    category: str
    kind: str
    lang: str
    question: str
    expect: tuple[str, ...]


@dataclass
class CategoryScore:
    """Accuracy of one category with its 95 % Wilson interval."""

    category: str
    n: int
    correct: int
    accuracy: float
    interval: tuple[float, float]


@dataclass
class ProbeResult:
    """Per-category scores plus every question, answer and verdict (for reading the misses)."""

    scores: dict[str, CategoryScore]
    answers: list[dict] = field(default_factory=list)

    def table(self) -> str:
        """A markdown table: category, n, accuracy [interval]."""
        rows = ["| category | n | right | accuracy [95 % interval] |", "|---|---|---|---|"]
        for s in self.scores.values():
            rows.append(f"| {s.category} | {s.n} | {s.correct} | {100 * s.accuracy:.1f} % "
                        f"[{100 * s.interval[0]:.1f}, {100 * s.interval[1]:.1f}] |")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"scores": {k: asdict(v) for k, v in self.scores.items()}, "answers": self.answers}


def load_probe_templates(knowledge_dir: Path | str = KNOWLEDGE_DIR) -> dict[str, Any]:
    """The held-out question forms (probe_templates.json)."""
    path = Path(knowledge_dir) / PROBE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: it ships with the repo under data/knowledge/")
    return json.loads(path.read_text(encoding="utf-8"))


def _without_parenthesis(name: str) -> str:
    return re.sub(r"\s*[（(][^)）]*[)）]\s*", " ", name).strip()


def name_variants(name: str) -> tuple[str, ...]:
    """The name, and without a parenthesis ("Hua Yanjun (Abing)" -> "Hua Yanjun"; 《》 dropped)."""
    out = [name.strip("《》")]
    short = _without_parenthesis(name).strip("《》")
    if short and short not in out:
        out.append(short)
    return tuple(out)


def probe_items(knowledge_dir: Path | str = KNOWLEDGE_DIR, per_kind: int | None = 25,
                seed: int = 0) -> list[ProbeItem]:
    """The probe's questions: every identity and ABC question, and `per_kind` random composers
    (works) per direction and language (None: all of them)."""
    folder = Path(knowledge_dir)
    t = load_probe_templates(folder)
    items = [ProbeItem("identity", "identity", lang, q, ("IMelodist",))
             for lang in ("en", "zh") for q in t["identity"][lang]]
    rng = random.Random(seed)
    sources = {"composer": composer_values(folder), "work": work_values(folder)}
    for kind in TEMPLATE_KINDS:
        what, _, target = kind.partition("_to_")
        rows = sources[what]
        picked = rows if per_kind is None else rng.sample(rows, min(per_kind, len(rows)))
        category = "composer_names" if what == "composer" else "work_titles"
        key = {"composer": {"zh": "zh", "en": "en"}, "work": {"zh": "title_zh", "en": "title_en"}}[what][target]
        for lang in ("en", "zh"):
            for values in picked:
                for template in t[kind][lang]:
                    items.append(ProbeItem(category, kind, lang, fill(template, values),
                                           name_variants(values[key])))
    items += [ProbeItem("abc_facts", "abc_fact", f["lang"], f["question"], tuple(f["expect"]))
              for f in t["abc_fact"]]
    return items


def _normal(text: str) -> str:
    return re.sub(r"[\s·・.,，。、'’\"“”《》()（）:：\-]", "", text).lower()


def is_right(answer: str, expect: Sequence[str]) -> bool:
    """True when the answer contains one of the expected strings (case-, space-, punctuation-insensitive)."""
    said = _normal(answer)
    return any(_normal(e) and _normal(e) in said for e in expect)


def _model_and_tokenizer(composer_or_model: Any, tokenizer: Any = None):
    engine = getattr(composer_or_model, "engine", None)
    if engine is not None and hasattr(engine, "model"):
        return engine.model, engine.tokenizer
    if isinstance(composer_or_model, (str, Path)):
        from imelodist_lib.models import load_model

        return load_model(composer_or_model)
    if isinstance(composer_or_model, tuple):
        return composer_or_model
    if tokenizer is None:
        raise ValueError("knowledge_probe needs a model directory, a Composer (transformers backend) "
                         "or a model with tokenizer=...")
    return composer_or_model, tokenizer


def answer_questions(model: Any, tokenizer: Any, questions: Sequence[str], max_new_tokens: int = 40,
                     batch_size: int = 32, utf8_mask: bool = True) -> list[str]:
    """Greedy chat answers to plain questions, batched (left padding), optionally under the UTF-8 mask."""
    from transformers import LogitsProcessorList

    from imelodist_lib.models import IM_END
    from imelodist_lib.utf8 import Utf8LogitsProcessor, build_table

    table = build_table(tokenizer, model.config.vocab_size) if utf8_mask else None
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[str] = []
    try:
        for start in range(0, len(questions), batch_size):
            chunk = questions[start:start + batch_size]
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                   add_generation_prompt=True) for q in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            processors = LogitsProcessorList([Utf8LogitsProcessor(tokenizer, table=table)] if table else [])
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     logits_processor=processors, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.convert_tokens_to_ids(IM_END))
            out += [tokenizer.decode(row, skip_special_tokens=True).strip()
                    for row in ids[:, enc["input_ids"].shape[1]:]]
    finally:
        tokenizer.padding_side = side
    return out


def knowledge_probe(composer_or_model: Any, tokenizer: Any = None, items: Sequence[ProbeItem] | None = None,
                    per_kind: int | None = 25, seed: int = 0, max_new_tokens: int = 40,
                    utf8_mask: bool = True) -> ProbeResult:
    """Ask the held-out questions, score each answer, and return per-category accuracy
    (identity, composer_names, work_titles, abc_facts) with Wilson intervals."""
    model, tokenizer = _model_and_tokenizer(composer_or_model, tokenizer)
    items = list(items) if items is not None else probe_items(per_kind=per_kind, seed=seed)
    answers = answer_questions(model, tokenizer, [i.question for i in items], max_new_tokens,
                               utf8_mask=utf8_mask)
    rows = [{**asdict(i), "answer": a, "right": is_right(a, i.expect)} for i, a in zip(items, answers)]
    scores = {}
    for category in CATEGORIES:
        hits = [r["right"] for r in rows if r["category"] == category]
        if hits:
            k = sum(hits)
            scores[category] = CategoryScore(category, len(hits), k, k / len(hits), wilson_interval(k, len(hits)))
    return ProbeResult(scores, rows)


def main(argv: list[str] | None = None) -> int:
    """CLI: print the knowledge probe's table for a model directory (and write its answers)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m imelodist_lib.probes", description=main.__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--per-kind", type=int, default=25)
    parser.add_argument("--no-utf8-mask", action="store_true")
    parser.add_argument("--out", default=None, help="write the answers and scores as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = knowledge_probe(args.model, per_kind=args.per_kind, utf8_mask=not args.no_utf8_mask)
    print(result.table())
    if args.out:
        Path(args.out).write_text(json.dumps(result.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
