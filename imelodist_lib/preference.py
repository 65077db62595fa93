"""Preference tuning (DPO) on the project's own symbolic rewards (notebook 07).

The SFT model answers each training request k times; every answer is scored by the rules the
evaluation already uses (`evaluation.score_answer`: valid ABC, bars of the right length, the
requested key/mode/meter/length/chords honoured, the given opening continued), whether it ended
by itself rather than at the token limit, two closeness-to-human terms (how often a bar repeats
an earlier one, how varied the rhythm is, against the training tunes' own averages) and a
penalty for a near-copy of a training tune.
The best and the worst answer of a request form one (chosen, rejected) pair when their rewards
differ by at least `min_margin`, and TRL's `DPOTrainer` trains on the pairs: full weights for
IMelodist-tiny, LoRA at GPU size (`train._lora_config`, chosen by `profile.use_lora`).
No reward model is learned: the reward is the checkable part of what the issue asks for.

`python -m imelodist_lib.preference` runs one round at a size of your choosing (`main`), with
requests shaped like the test split's or drawn like the any-request suite (`training_requests`).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from imelodist_lib import abc
from imelodist_lib.evaluation import (
    NEAR_COPY,
    NoveltyIndex,
    musical_statistics,
    parse_answer,
    score_answer,
    summarize,
)
from imelodist_lib.instructions import ComposeRequest
from imelodist_lib.profiles import Profile

# The human side of "closer to human statistics" when no training tunes are given (model card:
# 20 % of a human tune's bars repeat an earlier one; duration entropy measured like the tunes').
HUMAN_DEFAULTS = {"repeated_bar_share": 0.20, "rhythm_entropy": 1.5}
ADHERENCE = ("key_match", "mode_match", "meter_match", "length_match", "chord_adherence", "continued")
REWARD_WEIGHTS = {"valid": 2.0, "bar_accuracy": 2.0, "adherence": 2.0, "length": 2.0, "stopped": 1.0,
                  "repetition": 1.0, "rhythm": 0.5, "near_copy": -2.0}


@dataclass(frozen=True)
class PreferenceSizes:
    """How big one preference round is (CPU: a notebook run in a minute or two)."""

    train_requests: int
    heldout_requests: int
    samples_per_request: int  # k answers per request; best vs worst make one pair
    heldout_samples: int
    max_new_tokens: int
    dpo_steps: int
    batch_size: int
    learning_rate: float
    beta: float


def sizes_for(profile: Profile) -> PreferenceSizes:
    """The CPU or GPU sizes of a preference round, from the profile."""
    if profile.is_gpu:
        return PreferenceSizes(train_requests=400, heldout_requests=64, samples_per_request=8,
                               heldout_samples=2, max_new_tokens=profile.max_new_tokens, dpo_steps=300,
                               batch_size=8, learning_rate=5e-6, beta=0.1)
    return PreferenceSizes(train_requests=6, heldout_requests=4, samples_per_request=4, heldout_samples=2,
                           max_new_tokens=256, dpo_steps=6, batch_size=2, learning_rate=5e-5, beta=0.1)


@dataclass
class ScoredAnswer:
    """One answer, its reward, the reward's parts and evaluation's full row."""

    request: ComposeRequest
    text: str
    reward: float
    parts: dict[str, float]
    row: dict[str, Any] = field(repr=False, default_factory=dict)
    messages: list[dict] = field(repr=False, default_factory=list)  # system + user the answer replied to


@dataclass
class PreferencePair:
    """A request's best (chosen) and worst (rejected) answer."""

    chosen: ScoredAnswer
    rejected: ScoredAnswer

    @property
    def margin(self) -> float:
        return self.chosen.reward - self.rejected.reward


def human_statistics(tunes: Sequence[Any]) -> dict[str, float]:
    """Mean repeated-bar share and rhythm entropy of human tunes (records or ABC texts)."""
    sums = {k: [] for k in HUMAN_DEFAULTS}
    for t in tunes:
        try:
            stats = musical_statistics(parse_answer(getattr(t, "abc", t)), None)
        except (abc.ABCError, ValueError):
            continue
        for k in sums:
            if stats.get(k) is not None:
                sums[k].append(stats[k])
    return {k: (sum(v) / len(v) if v else HUMAN_DEFAULTS[k]) for k, v in sums.items()}


def reward_parts(request: ComposeRequest, answer: str, human: Mapping[str, float] | None = None,
                 novelty: NoveltyIndex | None = None, stopped: bool = True) -> tuple[dict[str, float], dict[str, Any]]:
    """The reward's parts for one answer (each in [0, 1]; near_copy 0/1) and evaluation's row.
    `stopped`: the answer ended with its stop token (False: cut off by the token limit)."""
    human = human or HUMAN_DEFAULTS
    row = score_answer(request, answer)
    parts = {"valid": float(row["valid"]), "stopped": float(stopped)}
    rate = row.get("bar_error_rate")
    parts["bar_accuracy"] = 0.0 if not row["valid"] else 1.0 - (rate if rate is not None else 0.0)
    asked = [row[m] for m in ADHERENCE if row.get(m) is not None]
    parts["adherence"] = sum(asked) / len(asked) if asked else parts["valid"]
    # length on its own (adherence's exact length_match is one of six): closer to the asked bars
    # scores higher, so even answers that all miss it rank; a request without a length: `valid`
    if request.bars and not request.chords:
        got = row.get("bars")
        parts["length"] = 0.0 if got is None else max(0.0, 1.0 - abs(got - request.bars) / request.bars)
    else:
        parts["length"] = parts["valid"]
    share, rhythm = row.get("repeated_bar_share"), row.get("rhythm_entropy")
    parts["repetition"] = 0.0 if share is None else max(0.0, 1.0 - abs(share - human["repeated_bar_share"]) / 0.5)
    parts["rhythm"] = 0.0 if rhythm is None else max(
        0.0, 1.0 - abs(rhythm - human["rhythm_entropy"]) / max(human["rhythm_entropy"], 1e-6))
    copy = 0.0
    if novelty is not None and row["valid"]:
        similarity, _ = novelty.query(answer)
        copy = float(similarity is not None and similarity >= NEAR_COPY)
    parts["near_copy"] = copy
    return parts, row


def total_reward(parts: Mapping[str, float], weights: Mapping[str, float] = REWARD_WEIGHTS) -> float:
    """The weighted sum of the parts (higher is better; a near-copy subtracts)."""
    return float(sum(weights[k] * parts.get(k, 0.0) for k in weights))


def score_answers(request: ComposeRequest, answers: Sequence[str], human: Mapping[str, float] | None = None,
                  novelty: NoveltyIndex | None = None, messages: list[dict] | None = None,
                  stopped: Sequence[bool] | None = None) -> list[ScoredAnswer]:
    """Every answer to one request, scored (`stopped`: per answer, whether it ended with its stop
    token; None: all did)."""
    out = []
    for i, text in enumerate(answers):
        parts, row = reward_parts(request, text, human, novelty, True if stopped is None else stopped[i])
        out.append(ScoredAnswer(request, text, total_reward(parts), parts, row, list(messages or [])))
    return out


def best_worst_pair(scored: Sequence[ScoredAnswer], min_margin: float = 0.5) -> PreferencePair | None:
    """The best and the worst answer of one request (ties: the earlier answer), or None when
    their rewards differ by less than `min_margin` or the two texts are the same."""
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda s: s.reward)
    worst = min(scored, key=lambda s: s.reward)
    if best.reward - worst.reward < min_margin or best.text == worst.text:
        return None
    return PreferencePair(best, worst)


def sample_and_score(composer: Any, requests: Sequence[ComposeRequest], k: int, seed: int = 0,
                     human: Mapping[str, float] | None = None, novelty: NoveltyIndex | None = None,
                     progress: bool = False, **compose_kwargs: Any) -> list[list[ScoredAnswer]]:
    """k answers per request from an `inference.Composer`, each scored (one list per request).
    The raw answer text is kept: DPO trains on what the model wrote."""
    from tqdm.auto import tqdm

    out = []
    for i, request in enumerate(tqdm(requests, desc="sample and score", unit="request", disable=not progress)):
        comps = composer.compose(request, n=k, seed=seed + i, template_index=0, **compose_kwargs)
        messages = composer.messages_for(request, 0)
        out.append(score_answers(request, [c.text for c in comps], human, novelty, messages,
                                 [c.finish_reason == "stop" for c in comps]))
    return out


def preference_pairs(scored: Sequence[Sequence[ScoredAnswer]], min_margin: float = 0.5) -> list[PreferencePair]:
    """One best-vs-worst pair per request whose answers differ enough."""
    return [p for p in (best_worst_pair(s, min_margin) for s in scored) if p is not None]


def dpo_dataset(pairs: Sequence[PreferencePair]):
    """The pairs as TRL's conversational preference records (prompt / chosen / rejected)."""
    from datasets import Dataset

    if not pairs:
        raise ValueError("no preference pairs: every request's answers scored alike; sample more "
                         "answers per request (k) or lower min_margin")
    return Dataset.from_list([{"prompt": p.chosen.messages,
                               "chosen": [{"role": "assistant", "content": p.chosen.text}],
                               "rejected": [{"role": "assistant", "content": p.rejected.text}]}
                              for p in pairs])


@dataclass
class PreferenceResult:
    """Where the tuned model is, and the DPO log."""

    model_dir: Path
    steps: int
    seconds: float
    log_history: list[dict]

    @property
    def losses(self) -> list[tuple[int, float]]:
        return [(h["step"], h["loss"]) for h in self.log_history if "loss" in h]


def preference_tuning(profile: Profile, model_dir: str | Path, pairs: Sequence[PreferencePair],
                      output_dir: str | Path, sizes: PreferenceSizes | None = None,
                      progress: bool = False) -> PreferenceResult:
    """DPO on the pairs (TRL DPOTrainer; LoRA when profile.use_lora, as in train), saved merged
    to output_dir/merged."""
    import torch
    from trl import DPOConfig, DPOTrainer

    from imelodist_lib.models import load_model, save_model
    from imelodist_lib.train import _lora_config

    sizes = sizes or sizes_for(profile)
    output_dir = Path(output_dir)
    model, tokenizer = load_model(model_dir, profile, for_training=True)
    peft_config = _lora_config(profile, model) if profile.use_lora else None
    cuda = torch.cuda.is_available()
    config = DPOConfig(output_dir=str(output_dir), max_steps=sizes.dpo_steps,
                       per_device_train_batch_size=sizes.batch_size, learning_rate=sizes.learning_rate,
                       beta=sizes.beta, max_length=profile.max_seq_len, logging_steps=1,
                       save_strategy="no", report_to="none", use_cpu=not cuda,
                       bf16=bool(profile.bf16 and cuda), seed=profile.seed,
                       disable_tqdm=not progress, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=dpo_dataset(pairs),
                         processing_class=tokenizer, peft_config=peft_config)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tuned = trainer.model
    if hasattr(tuned, "merge_and_unload"):
        tuned = tuned.merge_and_unload()
    tuned.config.use_cache = True
    target = save_model(tuned, tokenizer, output_dir / "merged")
    return PreferenceResult(Path(target), int(trainer.state.global_step), seconds, list(trainer.state.log_history))


PART_NAMES = tuple(REWARD_WEIGHTS)


def reward_table(systems: Mapping[str, Sequence[Sequence[ScoredAnswer]]]) -> list[dict]:
    """Rows (system, metric, mean, 95 % interval, n) for the reward and its parts, the answers of
    one request counted as one unit (`evaluation.summarize` with clusters)."""
    rows = []
    for name, per_request in systems.items():
        flat = [(i, s) for i, answers in enumerate(per_request) for s in answers]
        clusters = [i for i, _ in flat]
        for metric in ("reward",) + PART_NAMES:
            values = [s.reward if metric == "reward" else s.parts[metric] for _, s in flat]
            summary = summarize("valid" if metric in ("valid", "near_copy") else metric, values,
                                clusters=clusters)
            rows.append({"system": name, "metric": metric, "mean": summary.mean,
                         "ci_low": summary.ci_low, "ci_high": summary.ci_high, "n": summary.n})
    return rows


def plot_rewards(systems: Mapping[str, Sequence[Sequence[ScoredAnswer]]], ax=None):
    """Histograms of the total reward per system (e.g. before and after DPO), as a Figure."""
    import matplotlib.pyplot as plt

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.5))
    top = sum(w for w in REWARD_WEIGHTS.values() if w > 0)
    bins = [top * i / 16 for i in range(17)]
    for name, per_request in systems.items():
        values = [s.reward for answers in per_request for s in answers]
        mean = sum(values) / len(values) if values else math.nan
        ax.hist(values, bins=bins, alpha=0.5, label=f"{name} (mean {mean:.2f})")
    ax.set_xlabel(f"reward (0 .. {top:g})")
    ax.set_ylabel("answers")
    ax.set_title("symbolic reward on held-out requests")
    ax.legend()
    fig.tight_layout()
    return fig


def side_by_side(before: Sequence[Sequence[ScoredAnswer]], after: Sequence[Sequence[ScoredAnswer]],
                 n: int = 4, seed: int = 0) -> list[dict]:
    """Sample rows: a request, one answer before and one after, with their rewards."""
    idx = list(range(min(len(before), len(after))))
    random.Random(seed).shuffle(idx)
    rows = []
    for i in idx[:n]:
        b, a = before[i][0], after[i][0]
        rows.append({"task": b.request.task, "lang": b.request.lang,
                     "reward_before": round(b.reward, 2), "reward_after": round(a.reward, 2),
                     "valid_before": b.parts["valid"], "valid_after": a.parts["valid"],
                     "answer_before": b.text[:160], "answer_after": a.text[:160]})
    return rows


REQUEST_SOURCES = ("benchmark", "any")


def training_requests(tunes: Sequence[Any], profile: Profile, n: int, source: str = "benchmark",
                      seed: int = 1) -> list[ComposeRequest]:
    """`n` requests built from training tunes: "benchmark" (`evaluation.build_benchmark`: shaped like
    the test split's, what notebook 07 uses) or "any" (`request_suite.any_request_suite`'s draw:
    any of its keys, meters and lengths; continuations of these tunes)."""
    if source == "benchmark":
        from imelodist_lib.evaluation import build_benchmark

        return build_benchmark(list(tunes), profile, n=n, seed=seed)
    if source == "any":
        from imelodist_lib.request_suite import any_request_suite

        return any_request_suite(tunes, n=n, seed=seed)
    raise ValueError(f"source must be one of {REQUEST_SOURCES}, got {source!r}")


def main(argv: list[str] | None = None) -> int:
    """CLI: one preference round at a size of your choosing (notebook 07's code): sample k answers
    to each training request, score, pair best with worst, DPO; writes <output>/merged (the
    model) and <output>/preference.json (the command, pair counts, rewards, the DPO log)."""
    import argparse
    import json
    import shlex
    import sys

    import torch

    from imelodist_lib import corpus
    from imelodist_lib.inference import Composer
    from imelodist_lib.profiles import SHIPPED_MODEL_DIR, get_profile, parse_override

    parser = argparse.ArgumentParser(prog="python -m imelodist_lib.preference", description=main.__doc__)
    parser.add_argument("--base", default=str(SHIPPED_MODEL_DIR))
    parser.add_argument("--output", default="runs/preference")
    parser.add_argument("--tunes", default=None, help="tunes.jsonl (default runs/cpu/data/tunes.jsonl)")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--source", choices=REQUEST_SOURCES, default="any")
    parser.add_argument("--pool", type=int, default=3000, help="training tunes the requests are drawn from")
    parser.add_argument("--k", type=int, default=4, help="answers per request")
    parser.add_argument("--steps", type=int, default=100, help="DPO steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: Composer's (room for a stated length, else the profile's)")
    parser.add_argument("--min-margin", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="profile fields")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    profile = get_profile("cpu", **dict(parse_override(item) for item in args.set))
    tunes = corpus.read_jsonl(args.tunes or profile.run_dir / "data" / "tunes.jsonl")
    train = [r for r in tunes if r.split == "train"]
    if not train:
        raise SystemExit("no train-split tunes: run notebook 01 (or pass --tunes runs/<profile>/data/tunes.jsonl)")
    pool = random.Random(args.seed).sample(train, min(args.pool, len(train)))
    requests = training_requests(pool, profile, args.requests, args.source, args.seed)
    sizes = PreferenceSizes(train_requests=len(requests), heldout_requests=0, samples_per_request=args.k,
                            heldout_samples=0, max_new_tokens=args.max_new_tokens or profile.max_new_tokens,
                            dpo_steps=args.steps,
                            batch_size=args.batch_size, learning_rate=args.learning_rate, beta=args.beta)
    human = human_statistics(pool)
    novelty = NoveltyIndex(train)
    composer = Composer(args.base, profile=profile)
    start = time.perf_counter()
    scored = sample_and_score(composer, requests, k=args.k, seed=args.seed * 1000, human=human,
                              novelty=novelty, progress=True, max_new_tokens=args.max_new_tokens)
    sampling_seconds = time.perf_counter() - start
    pairs = preference_pairs(scored, min_margin=args.min_margin)
    print(json.dumps({"requests": len(requests), "answers": sum(map(len, scored)), "pairs": len(pairs),
                      "sampling_seconds": round(sampling_seconds)}), flush=True)
    del composer
    result = preference_tuning(profile, args.base, pairs, args.output, sizes, progress=True)
    means = {m: sum(s.parts[m] if m != "reward" else s.reward for a in scored for s in a) / sum(map(len, scored))
             for m in ("reward",) + PART_NAMES}
    log = {"command": "python -m imelodist_lib.preference " + shlex.join(sys.argv[1:] if argv is None else argv),
           "base": args.base, "requests": len(requests), "source": args.source, "k": args.k,
           "pairs": len(pairs), "mean_margin": sum(p.margin for p in pairs) / max(1, len(pairs)),
           "sampled_means": means, "sampling_seconds": sampling_seconds, "dpo_steps": result.steps,
           "dpo_seconds": result.seconds, "model_dir": str(result.model_dir), "log_history": result.log_history}
    Path(args.output, "preference.json").write_text(json.dumps(log, indent=1, ensure_ascii=False, default=str))
    print(json.dumps({k: v for k, v in log.items() if k != "log_history"}, indent=1, ensure_ascii=False, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
