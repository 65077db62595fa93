"""Short knowledge chats for instruction tuning: composer and work names zh<->en, who IMelodist
is, and ABC facts, asked and answered in many phrasings (issue 13, section 3).

Continued pretraining reads these facts as prose (`knowledge.load_knowledge`), but a 5M model
does not turn prose into answers to questions; SFT on question/answer pairs does. The question
and answer forms are data (`data/knowledge/knowledge_qa_templates.json`, CC BY 4.0); they never
use the held-out phrasings of `probes.py` (`data/knowledge/probe_templates.json`), so the probe
measures recall of the fact, not of the sentence. `mixed_sft_datasets` mixes them with ordinary
composing chats so a continued SFT does not forget how to compose.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

from imelodist_lib.instructions import build_instruction_records, chat_record, phrase_records
from imelodist_lib.knowledge import read_identity, read_tsv
from imelodist_lib.layout import counted_chat, laid_out_chat
from imelodist_lib.profiles import KNOWLEDGE_DIR, Profile, parse_override
from imelodist_lib.request_chats import copy_chats, request_chats, varied_continuations

TEMPLATES_FILE = "knowledge_qa_templates.json"
KNOWLEDGE_TASK = "knowledge"  # records' task tag: "knowledge/<kind>"
LANGS = ("en", "zh")


def load_templates(knowledge_dir: Path | str = KNOWLEDGE_DIR) -> dict[str, Any]:
    """The training question/answer forms (knowledge_qa_templates.json)."""
    path = Path(knowledge_dir) / TEMPLATES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: it ships with the repo under data/knowledge/ "
                                "(restore it with git, or pass knowledge_dir=...)")
    return json.loads(path.read_text(encoding="utf-8"))


def book_title(title_zh: str) -> str:
    """A Chinese title in 《》 (titles that already hold 《》, such as 《寄望于他》四十声部经文歌, as they are)."""
    return title_zh if "《" in title_zh else f"《{title_zh}》"


def fill(template: str, values: dict[str, str]) -> str:
    """A template with its {placeholders} filled; 《{title_zh}》 becomes book_title(title_zh)."""
    if "title_zh" in values:
        template = template.replace("《{title_zh}》", "{title_zh_book}")
        values = {**values, "title_zh_book": book_title(values["title_zh"])}
    return template.format(**values)


def composer_values(knowledge_dir: Path | str = KNOWLEDGE_DIR) -> list[dict[str, str]]:
    """{en, zh} per composer in composers.tsv."""
    return [{"en": r["english"], "zh": r["chinese"]}
            for r in read_tsv(Path(knowledge_dir) / "composers.tsv") if r.get("english") and r.get("chinese")]


def work_values(knowledge_dir: Path | str = KNOWLEDGE_DIR) -> list[dict[str, str]]:
    """{title_en, title_zh, composer_en, composer_zh} per work in works.tsv."""
    return [{"title_en": r["english"], "title_zh": r["chinese"], "composer_en": r["composer_english"],
             "composer_zh": r["composer_chinese"]}
            for r in read_tsv(Path(knowledge_dir) / "works.tsv") if r.get("english") and r.get("chinese")]


def _chat(kind: str, question: str, answer: str) -> dict:
    return chat_record(None, question, answer, None, f"{KNOWLEDGE_TASK}/{kind}")


def knowledge_chats(knowledge_dir: Path | str = KNOWLEDGE_DIR, rounds: int = 2,
                    small_repeats: int = 5, seed: int = 0, name_rounds: int | None = None) -> list[dict]:
    """Chat records teaching the knowledge facts. Each of the first `name_rounds` rounds (default:
    all `rounds`) asks every composer and work in both directions and both languages (a random
    template each time; works also "who composed"); identity, the ABC inventor and the header
    fields are few facts, so every round repeats their every template `small_repeats` times. The
    identity.jsonl pairs come once per round."""
    folder = Path(knowledge_dir)
    t = load_templates(folder)
    rng = random.Random(seed)
    out: list[dict] = []
    composers, works = composer_values(folder), work_values(folder)
    name_rounds = rounds if name_rounds is None else name_rounds
    for round_index in range(rounds):
        named = (("composer_to_zh", composers), ("composer_to_en", composers), ("work_to_zh", works),
                 ("work_to_en", works), ("work_composer", works)) if round_index < name_rounds else ()
        for kind, rows in named:
            for values in rows:
                for lang in LANGS:
                    q, a = rng.choice(t[kind][lang])
                    out.append(_chat(kind, fill(q, values), fill(a, values)))
        for _ in range(small_repeats):
            for kind in ("identity", "abc_inventor"):
                for lang in LANGS:
                    out.extend(_chat(kind, q, a) for q, a in t[kind][lang])
            for values in t["abc_fields"]:
                for lang in LANGS:
                    q, a = rng.choice(t["abc_field"][lang])
                    out.append(_chat("abc_field", fill(q, values), fill(a, values)))
        out.extend(_chat("identity", p["question"], p["answer"]) for p in read_identity(folder))
    rng.shuffle(out)
    return out


def composing_chats(records: Sequence[Any], profile: Profile, seed: int = 0) -> list[dict]:
    """Ordinary composing chats (moved to random keys, as the shipped model's stage 2d) plus the
    profile's phrase chats for `records`: the rehearsal half of a knowledge SFT."""
    chats = build_instruction_records(records, profile, random.Random(f"{seed}/compose"),
                                      transposed_share=profile.transposed_chat_share)
    return chats + phrase_records(records, profile, random.Random(f"{seed}/phrase"))


def mixed_sft_datasets(profile: Profile, tunes: Sequence[Any], n_tunes: int = 1500,
                       n_validation: int = 48, rounds: int = 2, seed: int = 0,
                       knowledge_dir: Path | str = KNOWLEDGE_DIR, small_repeats: int = 5,
                       n_request_chats: int = 0, name_rounds: int | None = None,
                       bars_per_line: int = 0, n_copy_chats: int = 0, bar_counts: bool = False,
                       n_varied_continuations: int = 0):
    """DatasetDict(train: knowledge chats + composing chats of `n_tunes` random train tunes +
    `n_request_chats` chats drawn like the any-request suite (`request_chats`) + `n_copy_chats`
    chats asking to copy a random-note tune (`copy_chats`) + `n_varied_continuations`
    continuations with altered given bars (`varied_continuations`),
    validation: ordinary chats of the first `n_validation` validation tunes) for
    `train.instruction_tuning(..., datasets=...)`. `bars_per_line` > 0 lays every composing
    answer out that many bars a line (`layout.laid_out_chat`); 0 keeps the sources' lines.
    `bar_counts` also writes a running bar count in every answer whose request states a length
    (`layout.counted_chat`), in validation too."""
    from datasets import Dataset, DatasetDict

    train_tunes = [r for r in tunes if r.split == "train"]
    val_tunes = [r for r in tunes if r.split == "validation"][:n_validation]
    if not train_tunes:
        raise ValueError("no train-split tunes: pass corpus records (corpus.read_jsonl of "
                         "runs/<profile>/data/tunes.jsonl, written by notebook 01)")
    picked = random.Random(seed).sample(train_tunes, min(n_tunes, len(train_tunes)))
    rows = (knowledge_chats(knowledge_dir, rounds=rounds, small_repeats=small_repeats, seed=seed,
                            name_rounds=name_rounds)
            + composing_chats(picked, profile, seed)
            + request_chats(train_tunes, n_request_chats, seed=seed) + copy_chats(n_copy_chats, seed=seed)
            + varied_continuations(train_tunes, n_varied_continuations, seed=seed))
    random.Random(seed).shuffle(rows)
    val = build_instruction_records(val_tunes, profile, random.Random(f"{seed}/validation"))
    if bar_counts:
        rows = [counted_chat(r, bars_per_line) for r in rows]
        val = [counted_chat(r, bars_per_line) for r in val]
    elif bars_per_line:
        rows = [laid_out_chat(r, bars_per_line) for r in rows]
        val = [laid_out_chat(r, bars_per_line) for r in val]
    keep = ("messages", "task")
    return DatasetDict({"train": Dataset.from_list([{k: r[k] for k in keep} for r in rows]),
                        "validation": Dataset.from_list([{k: r[k] for k in keep} for r in val])})


def main(argv: list[str] | None = None) -> int:
    """CLI: continued SFT of a model on knowledge chats mixed with composing chats (resumable)."""
    import argparse

    import torch

    from imelodist_lib import corpus
    from imelodist_lib.profiles import SHIPPED_MODEL_DIR, get_profile
    from imelodist_lib.train import instruction_tuning

    parser = argparse.ArgumentParser(prog="python -m imelodist_lib.knowledge_chats",
                                     description=main.__doc__)
    parser.add_argument("--base", default=str(SHIPPED_MODEL_DIR))
    parser.add_argument("--output", default="runs/knowledge-sft")
    parser.add_argument("--tunes", default=None, help="tunes.jsonl (default runs/cpu/data/tunes.jsonl)")
    parser.add_argument("--n-tunes", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--small-repeats", type=int, default=5,
                        help="times per round each identity/ABC template is asked")
    parser.add_argument("--name-rounds", type=int, default=None,
                        help="rounds that ask the composer and work names (default: all --rounds)")
    parser.add_argument("--request-chats", type=int, default=0,
                        help="chats drawn like the any-request suite (request_chats)")
    parser.add_argument("--copy-chats", type=int, default=0,
                        help="chats asking to copy a random-note tune (request_chats.copy_chats)")
    parser.add_argument("--bars-per-line", type=int, default=0,
                        help="lay composing answers out this many bars a line (0: as the sources)")
    parser.add_argument("--varied-continuations", type=int, default=0,
                        help="continuation chats with altered given bars (request_chats.varied_continuations)")
    parser.add_argument("--bar-counts", action="store_true",
                        help="answers to requests with a length write a running bar count (layout.counted_chat)")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {"instructions_per_tune": 1, "transposed_chat_share": 1.0, "phrase_chats_per_tune": 1,
                 "max_seq_len": 768, "batch_size": 8, "learning_rate": 5e-4, "eval_steps": 200,
                 "save_steps": 100, "sft_epochs": 1.0}
    overrides.update(parse_override(item) for item in args.set)  # type-checked against Profile
    profile = get_profile("cpu", **overrides)
    tunes = corpus.read_jsonl(args.tunes or profile.run_dir / "data" / "tunes.jsonl")
    data = mixed_sft_datasets(profile, tunes, n_tunes=args.n_tunes, rounds=args.rounds, seed=profile.seed,
                              small_repeats=args.small_repeats, n_request_chats=args.request_chats,
                              name_rounds=args.name_rounds, bars_per_line=args.bars_per_line,
                              n_copy_chats=args.copy_chats, bar_counts=args.bar_counts,
                              n_varied_continuations=args.varied_continuations)
    print(json.dumps({"train": len(data["train"]), "validation": len(data["validation"])}), flush=True)
    result = instruction_tuning(profile, args.base, args.output, max_steps=args.max_steps,
                                resume=args.resume, progress=False, datasets=data)
    print(json.dumps(result.summary(), indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
