"""`make bench`: run every benchmarks/bench_*.py, then gather their results into RESULTS.md.

Each bench writes benchmarks/results/<topic>.json (figures plus the command that made them) and
optionally <topic>.md; this script only runs them and collects, so each stays runnable alone.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def flat_scalars(data: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Top-level and nested scalar figures of a results file, as (dotted name, value) rows."""
    rows: list[tuple[str, object]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += flat_scalars(value, name + ".")
        elif isinstance(value, (int, float, str, bool)) and len(str(value)) < 120:
            rows.append((name, value))
    return rows


def collect() -> str:
    """RESULTS.md text: each topic's own Markdown when it wrote one, else its scalar figures."""
    parts = ["# Benchmark results\n", "Written by `make bench` (benchmarks/run_all.py). "
             "Each section names the command that made its figures.\n"]
    for path in sorted(RESULTS.glob("*.json")):
        md = path.with_suffix(".md")
        parts.append(f"\n## {path.stem}\n")
        if md.exists():
            parts.append(md.read_text(encoding="utf-8"))
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        parts.append("| figure | value |\n|---|---|")
        parts += [f"| {k} | {v} |" for k, v in flat_scalars(data)]
    return "\n".join(parts) + "\n"


def main() -> int:
    RESULTS.mkdir(exist_ok=True)
    failed = []
    # --collect-only: rewrite RESULTS.md from the results files already there (no bench is run)
    benches = [] if "--collect-only" in sys.argv[1:] else sorted(HERE.glob("bench_*.py"))
    for bench in benches:
        start = time.perf_counter()
        print(f"== {bench.name}", flush=True)
        if subprocess.call([sys.executable, str(bench)], cwd=HERE.parent) != 0:
            failed.append(bench.name)
        print(f"   {time.perf_counter() - start:.0f} s", flush=True)
    (HERE / "RESULTS.md").write_text(collect(), encoding="utf-8")
    print(f"results: {HERE / 'RESULTS.md'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
