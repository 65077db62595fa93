"""Does the model follow any request? The any-request suite (imelodist_lib.request_suite).

    python benchmarks/bench_requests.py [--requests 80] [--samples 1] [--temperature T] [--model DIR] [--out DIR]

Requests drawn evenly over 38 keys (15 signatures major and minor, 8 modes), 10 meters, lengths
4-32 bars, the four composing kinds and zh/en; continuations start from held-out tunes
(notebook 01's test split). The profile's composer answers them sampled freely at the default
temperature and in guaranteed-valid mode. Writes benchmarks/results/requests.json (every figure
with its interval and the command) and requests.md.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from imelodist_lib import request_suite as rs
from imelodist_lib.evaluation import load_splits
from imelodist_lib.inference import Composer
from imelodist_lib.profiles import REPO_ROOT, get_profile

RESULTS = REPO_ROOT / "benchmarks" / "results"


def run(composer: Composer, requests: list, samples: int, temperature: float, constrained: bool,
        seed: int) -> dict:
    """Answer the suite once in one mode; the report, the time and two example answers."""
    start = time.perf_counter()
    answers = composer.compose_many(requests, n=samples, temperature=temperature, seed=seed,
                                    constrained=constrained)
    seconds = time.perf_counter() - start
    rows = rs.follow_rows(requests, answers)
    tokens = sum(a.completion_tokens for group in answers for a in group)
    return {"report": rs.follow_report(rows), "seconds": seconds, "tokens": tokens,
            "examples": [{"request": repr(r), "answer": group[0].text[:600]}
                         for r, group in list(zip(requests, answers))[:2]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=None, help="default: the profile's")
    parser.add_argument("--model", default=None, help="default: the profile's composer model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for requests.json/.md")
    args = parser.parse_args(argv)
    profile = get_profile("cpu")
    temperature = profile.temperature if args.temperature is None else args.temperature
    _, test = load_splits(profile, max_train=0)
    requests = rs.any_request_suite(test, n=args.requests, seed=args.seed)
    composer = Composer(args.model, profile=profile)
    results = {"command": "python benchmarks/bench_requests.py " + shlex.join(sys.argv[1:] if argv is None else argv),
               "model": str(args.model or profile.composer_model), "requests": len(requests),
               "samples": args.samples, "temperature": temperature, "targets": rs.TARGETS}
    for mode, constrained in (("free", False), ("guaranteed_valid", True)):
        results[mode] = run(composer, requests, args.samples, temperature, constrained, args.seed)
        print(mode, f"{results[mode]['seconds']:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "requests.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    md = [f"Command: `{results['command']}` ({len(requests)} requests x {args.samples} sample(s), "
          f"T={temperature}, model `{Path(results['model']).name}`; 95 % intervals over requests).", ""]
    for mode in ("free", "guaranteed_valid"):
        md += [f"### {mode.replace('_', '-')}", "", rs.markdown(results[mode]["report"]), ""]
    (args.out / "requests.md").write_text("\n".join(md), encoding="utf-8")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
