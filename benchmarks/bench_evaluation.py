"""Evaluation at a larger CPU size than notebook 06, plus the novelty index's speed.

    python benchmarks/bench_evaluation.py [--requests 32] [--samples 2] [--temperatures 0.6,1.0]

Writes benchmarks/results/evaluation.json (every figure and the command that made it) and
benchmarks/results/evaluation.md (the comparison table the README links); with --split validation,
evaluation_validation.json/.md (how the profile's temperature was chosen). Systems: the human
reference, the n-gram baseline, and the profile's composer model when it exists: sampled freely
at each temperature ("raw": the profile's default and 1.0) and in guaranteed-valid mode. The
novelty index is timed against brute force over the whole training split (queries per second,
and whether the pruned search finds the same best similarity).
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import sys
import time
from pathlib import Path

from imelodist_lib import evaluation as ev
from imelodist_lib import probes
from imelodist_lib.ngram import NGramComposer
from imelodist_lib.profiles import REPO_ROOT, get_profile

RESULTS = REPO_ROOT / "benchmarks" / "results"


def time_novelty(index: ev.NoveltyIndex, queries: list[str]) -> dict:
    """Queries per second of brute force, the exact pruned search and the candidates-only search,
    and how often each agrees with brute force on the best similarity."""
    strings = [s for s in (ev.compact_string(q, index.table) for q in queries) if s]
    out: dict = {"queries": len(strings), "train_tunes": len(index)}
    if not strings:  # --novelty-queries 0: nothing to time (the ratios below divide by the count)
        return out
    from rapidfuzz import fuzz, process

    t0 = time.perf_counter()
    brute = [process.extractOne(s, index.strings, scorer=fuzz.ratio)[1] / 100 for s in strings]
    out["brute_force_qps"] = len(strings) / (time.perf_counter() - t0)
    for name, exact in (("indexed_exact", True), ("candidates_only", False)):
        t0 = time.perf_counter()
        got = [index.query_string(s, exact=exact)[0] for s in strings]
        out[f"{name}_qps"] = len(strings) / (time.perf_counter() - t0)
        out[f"{name}_agreement"] = sum(abs(a - b) < 1e-9 for a, b in zip(got, brute)) / len(strings)
        out[f"{name}_max_abs_diff"] = max(abs(a - b) for a, b in zip(got, brute))
        out[f"{name}_near_copy_agreement"] = sum((a >= ev.NEAR_COPY) == (b >= ev.NEAR_COPY)
                                                 for a, b in zip(got, brute)) / len(strings)
    out["speedup_exact_vs_brute"] = out["indexed_exact_qps"] / out["brute_force_qps"]
    return out


def _novelty_section(novelty: dict) -> list[str]:
    """The novelty-index speed table (nothing when no query was timed)."""
    if not novelty["queries"]:
        return []
    return ["## Novelty index speed", "",
            f"{novelty['queries']} queries against {novelty['train_tunes']} training tunes:", "",
            "| search | queries/s | same best similarity as brute force | largest shortfall | "
            "same near-copy verdict |", "|---|---|---|---|---|",
            f"| brute force (rapidfuzz extractOne over all) | {novelty['brute_force_qps']:.1f} | 1.000 | 0 | 1.000 |",
            *[f"| {label} | {novelty[k + '_qps']:.1f} | {novelty[k + '_agreement']:.3f} | "
              f"{novelty[k + '_max_abs_diff']:.3f} | {novelty[k + '_near_copy_agreement']:.3f} |"
              for k, label in (("indexed_exact", "n-gram candidates, then histogram-bound pruned exact scan"),
                               ("candidates_only", "n-gram candidates only (a lower bound)"))], ""]


def _prompt_section(reads_prompt: dict | None, copying: dict | None) -> list[str]:
    """Markdown: does the model read the request (forced choice on the header) and copy from context."""
    if not reads_prompt:
        return []
    rows = [f"| {f} | {r['n']} | {r['candidates']} | {r['asked']:.2f} | {r['swapped']:.2f} "
            f"[{r['swapped_interval'][0]:.2f}, {r['swapped_interval'][1]:.2f}] | {1 / r['candidates']:.2f} |"
            for f, r in reads_prompt.items()]
    return ["## Does the model read the request?", "",
            "Forced choice (`probes.prompt_following`): after the reference answer's header up to "
            "`K:`/`M:`, which candidate value is likeliest? *swapped*: the same request asking for "
            "another value; a model that ignores the prompt scores about chance there.", "",
            "| field | requests | candidates | asked value wins | swapped value wins [95 %] | chance |",
            "|---|---|---|---|---|---|", *rows, "",
            f"In-context copying (`probes.copy_test`, 8 x 50 random tokens written twice): loss "
            f"{copying['first_copy_loss']:.2f} nats/token on the first copy, "
            f"{copying['second_copy_loss']:.2f} on the second (gain {copying['copy_gain']:.2f}; "
            f"uniform would be {copying['uniform_loss']:.2f}).", ""]


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and write the results files; returns the JSON payload."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32, help="benchmark requests (notebook: 8)")
    ap.add_argument("--samples", type=int, default=2, help="answers per request")
    ap.add_argument("--temperatures", default=None,
                    help="comma-separated sampling temperatures for the raw model (default: the "
                         "profile's, 0.5 at CPU size, and 1.0); valid mode samples at the first")
    ap.add_argument("--split", choices=["test", "validation"], default="test",
                    help="held-out split the requests come from (validation: for choosing settings)")
    ap.add_argument("--train-tunes", type=int, default=0, help="0: the whole training split")
    ap.add_argument("--novelty-queries", type=int, default=200)
    ap.add_argument("--model", default=None, help="default: profile.composer_model")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--answers-dir", type=Path, default=None,
                    help="keep each model answer in DIR/<model>__<system>.jsonl as it arrives and "
                         "reuse them on a rerun (a crash or timeout loses nothing; timings then "
                         "cover only the new answers)")
    args = ap.parse_args(argv)
    profile = get_profile("cpu")
    temperatures = ([float(t) for t in args.temperatures.split(",")] if args.temperatures
                    else list(dict.fromkeys([profile.temperature, 1.0])))
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    train, test = ev.load_splits(profile, max_train=args.train_tunes or 10**9, held_out=args.split)
    timings["load_splits_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = ev.NoveltyIndex(train)
    timings["novelty_index_build_s"] = time.perf_counter() - t0  # includes parsing every tune
    t0 = time.perf_counter()
    ngram = NGramComposer(train, order=3)
    timings["ngram_fit_s"] = time.perf_counter() - t0

    requests = ev.build_benchmark(test, profile, n=args.requests)
    systems = {"human": ev.human_reference(test, profile, n=args.requests)}
    t0 = time.perf_counter()
    systems["n-gram"] = ev.collect_answers(ngram, requests, n=args.samples)
    timings["ngram_compose_s"] = time.perf_counter() - t0

    model_name = args.model or profile.composer_model
    perplexity = reads_prompt = copying = None
    try:
        from imelodist_lib.inference import Composer
        from imelodist_lib.models import load_model

        model, tokenizer = load_model(model_name, profile)
    except (FileNotFoundError, OSError) as err:
        model = None
        print(f"no model evaluated: {err}", file=sys.stderr)
    if model is not None:
        composer = Composer(model, tokenizer=tokenizer, profile=profile)
        runs = [(f"tiny raw T={t:g}", False, t) for t in temperatures] + \
            [(f"tiny valid-mode T={temperatures[0]:g}", True, temperatures[0])]
        for name, constrained, temperature in runs:
            t0 = time.perf_counter()
            answers = None if args.answers_dir is None else args.answers_dir / re.sub(
                r"[^A-Za-z0-9_.=-]+", "_", f"{Path(model_name).name}__{name}.jsonl")
            systems[name] = ev.collect_answers(composer, requests, n=args.samples, constrained=constrained,
                                               temperature=temperature, results_path=answers)
            timings[f"{name.replace(' ', '_')}_compose_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        perplexity = probes.perplexity(model, tokenizer, [r.abc for r in test[:64]], max_len=profile.max_seq_len)
        timings["perplexity_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        reads_prompt = {f: vars(probes.prompt_following(model, tokenizer, systems["human"], f))
                        for f in ("key", "meter")}
        copying = probes.copy_test(model, tokenizer)
        timings["prompt_test_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results = ev.evaluate_systems(systems, index, music21_sample=64)
    timings["scoring_s"] = time.perf_counter() - t0

    queries = [r.abc for r in test][: args.novelty_queries // 2] + \
        [a for _, a in systems["n-gram"]][: args.novelty_queries // 2]
    novelty = time_novelty(index, queries)

    payload = {
        "command": " ".join(["python", "benchmarks/" + Path(__file__).name,
                             shlex.join(sys.argv[1:] if argv is None else argv)]).strip(),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine()},
        "profile": profile.name, "model": str(model_name) if model is not None else None,
        "requests": len(requests), "samples_per_request": args.samples, "temperatures": temperatures,
        "split": args.split, "train_tunes": len(train), "held_out_tunes": len(test),
        "perplexity_test": perplexity, "prompt_following": reads_prompt, "copy_test": copying,
        "timings": timings, "novelty_index": novelty,
        "systems": {r.system: [vars(s) for s in r.summary] for r in results},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "evaluation" if args.split == "test" else f"evaluation_{args.split}"
    (args.out / f"{stem}.json").write_text(json.dumps(payload, ensure_ascii=False, indent=1, default=float),
                                           encoding="utf-8")
    md = [f"# Evaluation ({len(requests)} {args.split} requests x {args.samples} samples, CPU profile)", "",
          f"Command: `{payload['command']}`", "",
          "Each cell: mean [95 % interval] n=answers (Wilson for rates, seeded bootstrap for means; "
          "requests are the independent units).",
          "", ev.markdown_table(results),
          f"Perplexity of the model on 64 held-out {args.split} tunes: "
          f"{perplexity:.2f}" if perplexity else "No model evaluated (none found).", "",
          *_prompt_section(reads_prompt, copying),
          *_novelty_section(novelty)]
    (args.out / f"{stem}.md").write_text("\n".join(md), encoding="utf-8")
    print(json.dumps({"timings": timings, "novelty_index": novelty}, indent=1))
    return payload


if __name__ == "__main__":
    main()
