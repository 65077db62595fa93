"""Probes that ask a model questions and score its answers (issue 13, section 2).

`knowledge_probe`: does the model know who it is, composers' and works' names in Chinese and
English, and a few ABC facts? The questions use held-out phrasings
(`data/knowledge/probe_templates.json`), none of them in any training record
(`tests/test_probes.py` checks), so a right answer means the model recalls the fact, not a
sentence it saw. An answer is right when it contains an expected string (case-, space- and
punctuation-insensitive; a name without its parenthesis counts). Greedy decoding, so one run
is one measurement; rates come with Wilson intervals (`evaluation.wilson_interval`).

The probes that read a model's own likelihoods: `perplexity` on held-out text,
`prompt_following` (does the answer's header take the requested key or meter?) and
`copy_test` (can the model copy from its context?).

    python -m imelodist_lib.probes --model data/models/imelodist-tiny
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from imelodist_lib.evaluation import Pair, wilson_interval
from imelodist_lib.instructions import ComposeRequest
from imelodist_lib.knowledge_chats import composer_values, fill, work_values
from imelodist_lib.profiles import KNOWLEDGE_DIR

PROBE_FILE = "probe_templates.json"
CATEGORIES = ("identity", "composer_names", "work_titles", "abc_facts")
# what the shipped model should reach (issue 13); ABC facts are few questions, reported only
TARGETS = {"identity": 0.9, "composer_names": 0.6, "work_titles": 0.4}
# The identity score counts answers naming IMelodist, so a model that says "I am IMelodist" to
# every question would score 100 %: the share of the *other* questions answered with the name is
# reported beside it (lower is better).
IDENTITY_LEAK = "identity_leak"
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
        """A markdown table: category, n, accuracy [interval] (the identity leak: the share of
        non-identity questions answered with the model's name, lower is better)."""
        rows = ["| category | n | right | accuracy [95 % interval] |", "|---|---|---|---|"]
        for s in self.scores.values():
            label = (f"{s.category} (other questions answered \"IMelodist\"; lower is better)"
                     if s.category == IDENTITY_LEAK else s.category)
            rows.append(f"| {label} | {s.n} | {s.correct} | {100 * s.accuracy:.1f} % "
                        f"[{100 * s.interval[0]:.1f}, {100 * s.interval[1]:.1f}] |")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"scores": {k: asdict(v) for k, v in self.scores.items()}, "answers": self.answers}

    def plot(self, targets: dict[str, float] = TARGETS):
        """Accuracy per category with its 95 % interval, and the target as a tick where there is one."""
        import matplotlib.pyplot as plt

        scores = list(self.scores.values())
        fig, ax = plt.subplots(figsize=(1.6 * len(scores) + 1.5, 2.8))
        labelled = False
        for i, s in enumerate(scores):
            low, high = 100 * (s.accuracy - s.interval[0]), 100 * (s.interval[1] - s.accuracy)
            ax.bar(i, 100 * s.accuracy, yerr=[[low], [high]], capsize=4,
                   color="tab:gray" if s.category == IDENTITY_LEAK else "tab:blue")
            if s.category in targets:
                ax.hlines(100 * targets[s.category], i - 0.4, i + 0.4, colors="tab:red", linestyles="--",
                          label=None if labelled else "target")
                labelled = True
        names = {IDENTITY_LEAK: "identity leak\n(lower is better)"}
        ax.set_xticks(range(len(scores)), [f"{names.get(s.category, s.category)}\nn={s.n}" for s in scores],
                      fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("right answers (%)")
        ax.set_title("knowledge probe (held-out phrasings)", fontsize=9)
        if any(s.category in targets for s in scores):
            ax.legend(fontsize=8, loc="upper right")
        fig.tight_layout()
        return fig


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


def answer_text(tokenizer: Any, ids: Any, masked: bool = True) -> str:
    """An answer's text from its new token ids. Under the UTF-8 mask (`masked`) every character
    is whole except where the token limit cut the last one short, which decodes as U+FFFD at the
    very end: that unfinished piece is dropped. Unmasked text is left as decoded."""
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return text.rstrip("\ufffd").rstrip() if masked else text


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
            out += [answer_text(tokenizer, row, masked=table is not None)
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
    others = [is_right(r["answer"], ("IMelodist",)) for r in rows if r["category"] != "identity"]
    if others:
        k = sum(others)
        scores[IDENTITY_LEAK] = CategoryScore(IDENTITY_LEAK, len(others), k, k / len(others),
                                              wilson_interval(k, len(others)))
    return ProbeResult(scores, rows)


# --------------------------------------------------------------------------------------------
# Perplexity of a model on held-out text
# --------------------------------------------------------------------------------------------
def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], max_len: int = 512,
               batch_size: int = 8) -> float:
    """Token-level perplexity exp(mean negative log-likelihood) of `texts` under a causal LM,
    batch by batch in plain torch (right padding, padded positions masked out)."""
    import torch
    import torch.nn.functional as F

    if not texts:
        raise ValueError("perplexity needs at least one text")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            encoded = [tokenizer(t, truncation=True, max_length=max_len)["input_ids"]
                       for t in texts[start:start + batch_size]]
            encoded = [ids for ids in encoded if len(ids) >= 2]  # one token predicts nothing
            if not encoded:
                continue
            width = max(len(ids) for ids in encoded)
            ids = torch.zeros((len(encoded), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(encoded):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target, keep = ids[:, 1:], mask[:, 1:].bool()
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                  reduction="none").view_as(target)
            total_nll += float(nll[keep].sum())
            total_tokens += int(keep.sum())
    if was_training:
        model.train()
    if total_tokens == 0:
        raise ValueError("perplexity: no text had two or more tokens")
    return math.exp(total_nll / total_tokens)


# --------------------------------------------------------------------------------------------
# Does the model read the request? A forced-choice test on the answer's header
# --------------------------------------------------------------------------------------------
PROBE_VALUES = {
    "meter": ("2/4", "3/4", "4/4", "6/8", "3/8", "9/8", "C", "C|"),
    "key": ("C", "G", "D", "A", "E", "F", "Bb", "Eb", "Am", "Em", "Dm", "Gm"),
}
_HEADER_LETTER = {"meter": "M", "key": "K"}


@dataclass
class PromptFollowing:
    """Forced-choice prompt test for one header field (see `prompt_following`)."""

    field: str
    n: int  # requests that name the field
    candidates: int  # values scored per request (chance = 1 / candidates)
    asked: float  # share where the requested value is the likeliest
    swapped: float  # share where, asked for another value, that value is the likeliest
    swapped_interval: tuple[float, float] = (0.0, 0.0)


def _answer_loglik(model: Any, tokenizer: Any, prompt_ids: list[int], answers: Sequence[str]) -> list[float]:
    """Summed log-probability of each answer text after the same chat prompt. The tokens all
    rows share (the prompt and the common start of the answers) run once, with a KV cache that
    the rows' own endings then extend in one batch: a candidate costs its few last tokens."""
    import torch

    rows = [prompt_ids + tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    shared = len(prompt_ids)
    while all(len(r) > shared for r in rows) and len({r[shared] for r in rows}) == 1:
        shared += 1
    device = next(model.parameters()).device
    with torch.no_grad():
        head = model(input_ids=torch.tensor([rows[0][:shared]], device=device), use_cache=True)
        head_logp = torch.log_softmax(head.logits[0].float(), dim=-1)
        # the answer's shared start, scored once (row i's total includes it), then the token after it
        common = sum(float(head_logp[j - 1, rows[0][j]]) for j in range(len(prompt_ids), shared))
        first = head_logp[-1]  # predicts token `shared`
        tails = [r[shared:] for r in rows]
        width = max(len(t) for t in tails)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([t + [pad] * (width - len(t)) for t in tails], device=device)
        mask = torch.tensor([[1] * (shared + len(t)) + [0] * (width - len(t)) for t in tails], device=device)
        name = "cache" if "cache" in head.keys() else "past_key_values"  # transformers >= 5.2 says "cache"
        cache = head[name]
        cache.batch_repeat_interleave(len(rows))
        logits = model(input_ids=ids, attention_mask=mask, **{name: cache}).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None])[..., 0]
    return [common + float(first[t[0]]) + float(logp[i, :len(t) - 1].sum()) for i, t in enumerate(tails)]


def prompt_following(model: Any, tokenizer: Any, pairs: Sequence[Pair], field: str,
                     seed: int = 0) -> PromptFollowing:
    """Does the model take the key or meter from the request? For every (request, reference
    answer) that names `field`, the answer's header up to `K:`/`M:` is followed by each candidate
    value (`PROBE_VALUES` plus the requested one) and the likeliest is the model's choice.
    `asked`: the requested value wins. `swapped`: the request is re-rendered asking for another
    candidate (seeded), same wording otherwise; a model that ignores the prompt and picks by its
    prior wins here at most about 1/candidates of the time. Needs no sampling: seconds on a CPU."""
    from imelodist_lib.instructions import render_prompt
    from imelodist_lib.profiles import SYSTEM_PROMPT

    if field not in _HEADER_LETTER:
        raise ValueError(f"field must be 'key' or 'meter', got {field!r}")
    letter = _HEADER_LETTER[field]
    rng = random.Random(seed)
    asked_hits, swapped_hits, n, width = 0, 0, 0, 0
    was_training = model.training
    model.eval()
    for request, reference in pairs:
        value = getattr(request, field)
        at = re.search(rf"^{letter}:", reference, re.M)
        if value is None or at is None:
            continue
        prefix = reference[:at.end()]
        candidates = sorted(set(PROBE_VALUES[field]) | {value})
        other = rng.choice([c for c in candidates if c != value])
        width = len(candidates)
        template_seed = rng.randrange(2**32)
        for wanted in (value, other):
            asking = request if wanted == value else _with_field(request, field, wanted)
            user = render_prompt(asking, rng=random.Random(template_seed))
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
            prompt_ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                            return_dict=True)["input_ids"])
            scores = _answer_loglik(model, tokenizer, prompt_ids, [f"{prefix}{c}\n" for c in candidates])
            best = candidates[int(np.argmax(scores))]
            if wanted == value:
                asked_hits += best == value
            else:
                swapped_hits += best == other
        n += 1
    if was_training:
        model.train()
    if n == 0:
        raise ValueError(f"prompt_following: no request names a {field}")
    return PromptFollowing(field=field, n=n, candidates=width, asked=asked_hits / n,
                           swapped=swapped_hits / n, swapped_interval=wilson_interval(swapped_hits, n))


def copy_test(model: Any, tokenizer: Any, length: int = 50, n: int = 8, seed: int = 0) -> dict[str, float]:
    """In-context copying ("induction") test: `n` sequences of `length` random tokens, each
    written twice. A model that can copy from its context predicts the second copy far better
    than the first (loss near 0 for large models); one that cannot scores both near
    log(vocabulary). Returns the mean loss (nats/token) on each half and their difference."""
    import torch

    vocab = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pool = torch.tensor([i for i in range(vocab) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    seq = pool[torch.randint(len(pool), (n, length), generator=generator)]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else int(pool[0])
    ids = torch.cat([torch.full((n, 1), bos), seq, seq], dim=1)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids.to(device)).logits.float()
    if was_training:
        model.train()
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None].to(device))[..., 0]
    first, second = float(nll[:, 1:length].mean()), float(nll[:, length + 1:].mean())
    return {"first_copy_loss": first, "second_copy_loss": second, "copy_gain": first - second,
            "uniform_loss": math.log(vocab)}


def _with_field(request: ComposeRequest, field: str, value: str) -> ComposeRequest:
    """The request asking for another key or meter; a continuation's given bars follow it."""
    from dataclasses import replace

    changed = replace(request, **{field: value})
    if request.seed_abc:
        letter = _HEADER_LETTER[field]
        changed = replace(changed, seed_abc=re.sub(rf"^{letter}:.*$", f"{letter}:{value}",
                                                   request.seed_abc, count=1, flags=re.M))
    return changed


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
