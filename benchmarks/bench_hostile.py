"""Time against input size for the text entry points, on ordinary and hostile input.

Each family of inputs grows from 1 KB to the entry point's size cap (abc.MAX_TUNE_CHARS for
parse+validate and normalize, inference.MAX_ANSWER_CHARS for extract_abc); above the cap the
text is refused, so the 1 MB point times the refusal. The figure to read is `exponent`: the
slope of log(time) against log(size) over the sizes up to the cap (1.0 is linear, 2.0
quadratic). Times are the best of `--repeats` runs on one core.

    python benchmarks/bench_hostile.py            # writes benchmarks/results/hostile.json
    python benchmarks/bench_hostile.py --repeats 1
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imelodist_lib import abc, inference  # noqa: E402
from imelodist_lib.abc import ABCError  # noqa: E402

HEADER = "X:1\nT:Bench\nM:4/4\nL:1/8\nQ:1/4=120\nK:D\n"
REEL_LINE = "|:d2fd adfd|d2fd e2dc|B2gB bBgB|ABce d4:|\n"  # 43 characters, four full bars
TUNE = HEADER + REEL_LINE * 4
ABC_SIZES = [1_000, 4_000, 16_000, 64_000, abc.MAX_TUNE_CHARS]
ANSWER_SIZES = [1_000, 4_000, 16_000, 64_000, inference.MAX_ANSWER_CHARS]
OVER_CAP = 1_000_000


def fill(unit: str, size: int, head: str = "", tail: str = "") -> str:
    """`head` + `unit` repeated + `tail`, `size` characters at most."""
    return head + unit * max(1, (size - len(head) - len(tail)) // len(unit)) + tail


TUNE_FAMILIES = {
    "reel lines": lambda n: fill(REEL_LINE, n, HEADER),
    "one bar of broken rhythms (A>B)": lambda n: fill("A>B", n, HEADER, "\n"),
    "voice switches after many bars": lambda n: (fill("z8|", n // 2, HEADER + "V:1\n")
                                                 + fill("[V:2]\n", n - n // 2, "\nV:2\n")),
    "Q: digit run (1/120/120/...)": lambda n: fill("120/", n, "X:1\nM:4/4\nL:1/8\nQ:1/",
                                                   "\nK:G\nGABc|\n"),
}
ANSWER_FAMILIES = {
    "chat answers with fenced tunes": lambda n: fill(f"Here is one:\n```abc\n{TUNE}```\nEnjoy!\n\n", n),
    "fence then spaces": lambda n: fill(" ", n, "```"),
    "inline-field openers ([A:)": lambda n: fill("[A:", n, "X:1\nM:4/4\nK:G\n"),
}


def best_time(fn, text: str, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls (an ABCError counts: refusing is an answer)."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            fn(text)
        except ABCError:
            pass
        best = min(best, time.perf_counter() - start)
    return best


def exponent(sizes: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) on log(size)."""
    xs, ys = [math.log(s) for s in sizes], [math.log(max(t, 1e-7)) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def parse_and_validate(text: str) -> None:
    abc.validate(text)


def measure(entry, families: dict, sizes: list[int], repeats: int) -> dict:
    """Per family: time at each size, the fitted exponent, and the time to refuse 1 MB."""
    out = {}
    for name, make in families.items():
        texts = [make(n) for n in sizes]
        seconds = [best_time(entry, t, repeats) for t in texts]
        refuse = best_time(entry, make(OVER_CAP), 1)
        out[name] = {"sizes": [len(t) for t in texts], "seconds": [round(s, 5) for s in seconds],
                     "exponent": round(exponent([len(t) for t in texts], seconds), 2),
                     "seconds_at_1MB_refused": round(refuse, 5)}
        print(f"{entry.__name__:>20}  {name:<35} exponent {out[name]['exponent']:.2f}  "
              f"{seconds[-1]:.3f} s at {len(texts[-1]):,} chars", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = {
        "command": "python benchmarks/bench_hostile.py" + (f" --repeats {args.repeats}"
                                                           if args.repeats != 3 else ""),
        "caps": {"abc.MAX_TUNE_CHARS": abc.MAX_TUNE_CHARS,
                 "inference.MAX_ANSWER_CHARS": inference.MAX_ANSWER_CHARS},
        "parse_and_validate": measure(parse_and_validate, TUNE_FAMILIES, ABC_SIZES, args.repeats),
        "normalize": measure(abc.normalize, TUNE_FAMILIES, ABC_SIZES, args.repeats),
        "extract_abc": measure(inference.extract_abc, ANSWER_FAMILIES, ANSWER_SIZES, args.repeats),
    }
    exponents = [fam["exponent"] for key in ("parse_and_validate", "normalize", "extract_abc")
                 for fam in results[key].values()]
    results["largest_exponent"] = max(exponents)
    out = ROOT / "benchmarks" / "results" / "hostile.json"
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"largest exponent {results['largest_exponent']} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
