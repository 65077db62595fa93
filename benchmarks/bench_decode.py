"""IMelodist-tiny decode speed: transformers' `generate` against the lean path (imelodist_lib.fast_decode).

In one run, on the same model and the same requests and seeds (the first `--requests` benchmark
requests), free and guaranteed-valid:
- single stream: one answer per call, `Composer(fast_decode=False)` (today's `generate`) and the
  lean path, calls interleaved so a change in the machine's load hits both alike;
- batched: `--batch` answers (8 and 16: `batch // requests` samples per request) as one
  `compose_many` call, against the same answers made one at a time by `generate` and by the lean path;
- the lean path at 1 and 2 CPU threads, and the time to read the weights (its start-up cost).
Figures are completion tokens per wall second and per CPU second of this process (the CPU
figure is steadier on a shared machine); the targets are the ratios, measured in this run.

    python benchmarks/bench_decode.py                  # writes benchmarks/results/decode.json
    python benchmarks/bench_decode.py --max-new-tokens 256 --batch 8 16 32
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from imelodist_lib.fast_decode import LeanLlama  # noqa: E402
from imelodist_lib.grammar import compile_grammar, grammar_for_request  # noqa: E402
from imelodist_lib.inference import Composer, _torch_threads, benchmark_requests  # noqa: E402
from imelodist_lib.profiles import SHIPPED_MODEL_DIR, get_profile  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "decode.json"


class Tally:
    """Completion tokens, wall seconds and CPU seconds summed over calls."""

    def __init__(self):
        self.tokens, self.wall, self.cpu, self.answers = 0, 0.0, 0.0, 0

    def timed(self, call):
        """Run `call()` (returning Compositions, flat or per request) and add its figures."""
        wall, cpu = time.perf_counter(), time.process_time()
        out = call()
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        flat = [c for item in out for c in (item if isinstance(item, list) else [item])]
        self.tokens += sum(c.completion_tokens for c in flat)
        self.answers += len(flat)
        return flat

    def figures(self) -> dict:
        return {"answers": self.answers, "completion_tokens": self.tokens, "wall_seconds": round(self.wall, 2),
                "tokens_per_second": round(self.tokens / self.wall, 1),
                "tokens_per_cpu_second": round(self.tokens / self.cpu, 1)}


def ratio(a: dict, b: dict) -> dict:
    """a's speed over b's, per wall second and per CPU second."""
    return {"wall": round(a["tokens_per_second"] / b["tokens_per_second"], 2),
            "cpu": round(a["tokens_per_cpu_second"] / b["tokens_per_cpu_second"], 2)}


def _same(a: list, b: list) -> str:
    """How many answers of two lists have the same text, as 'k/n'."""
    return f"{sum(x.text == y.text for x, y in zip(a, b))}/{len(a)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHIPPED_MODEL_DIR))
    parser.add_argument("--requests", type=int, default=4, help="benchmark requests used")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16],
                        help="answers in each batched call (multiples of --requests)")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--seed", type=int, default=100)
    args = parser.parse_args()

    profile = get_profile("cpu")
    lean = Composer(model=args.model, backend="transformers", profile=profile)
    model, tokenizer = lean.engine.model, lean.engine.tokenizer
    generate = Composer(model=model, tokenizer=tokenizer, backend="transformers", profile=profile, fast_decode=False)
    assert lean.engine.lean is not None and generate.engine.lean is None
    requests = benchmark_requests()[:args.requests]
    options = dict(max_new_tokens=args.max_new_tokens)
    for composer in (lean, generate):  # warm-up: first-call allocations, grammar compilation
        for constrained in (False, True):
            composer.compose(requests[0], max_new_tokens=4, seed=0, constrained=constrained)
    for request in requests:  # every request's grammar compiled before timing (xgrammar caches it)
        compile_grammar(tokenizer, grammar_for_request(request), vocab_size=model.config.vocab_size)
    start = time.perf_counter()
    LeanLlama(model)
    read_seconds = time.perf_counter() - start

    results: dict = {"command": "python " + " ".join(["benchmarks/bench_decode.py", *sys.argv[1:]]),
                     "model": args.model, "parameters": sum(p.numel() for p in model.parameters()),
                     "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
                     "load_average_at_start": round(os.getloadavg()[0], 2),
                     "threads": lean.engine.threads, "max_new_tokens": args.max_new_tokens,
                     "lean_weights_read_seconds": round(read_seconds, 4)}
    for mode, constrained in (("free", False), ("guaranteed_valid", True)):
        single = {"generate": Tally(), "lean": Tally()}
        same = 0
        for i, request in enumerate(requests):  # interleaved: generate, lean, lean, generate, ...
            order = ("generate", "lean") if i % 2 == 0 else ("lean", "generate")
            texts = {}
            for name in order:
                composer = generate if name == "generate" else lean
                [c] = single[name].timed(lambda: composer.compose(
                    request, seed=args.seed + i, constrained=constrained, **options))
                texts[name] = c.text
            same += texts["generate"] == texts["lean"]
        results[mode] = {"single_stream": {name: t.figures() for name, t in single.items()}}
        figures = results[mode]["single_stream"]
        results[mode]["single_stream_lean_over_generate"] = ratio(figures["lean"], figures["generate"])
        results[mode]["single_stream_same_text_as_generate"] = f"{same}/{len(requests)}"
        for size in args.batch:
            samples = max(1, size // len(requests))
            loops = {"generate": Tally(), "lean": Tally()}
            loop_answers: dict[str, list] = {"generate": [], "lean": []}
            for i, request in enumerate(requests):  # the batch's own answers, one compose per answer
                for j in range(samples):
                    for name, tally in loops.items():
                        composer = generate if name == "generate" else lean
                        loop_answers[name] += tally.timed(lambda: composer.compose(
                            request, n=1, seed=args.seed + i + j, constrained=constrained, **options))
            batched = Tally()
            batch_answers = batched.timed(lambda: lean.compose_many(requests, n=samples, seed=args.seed,
                                                                    constrained=constrained, **options))
            results[mode][f"batch_{len(batch_answers)}"] = {
                "lean_batch": batched.figures(), "lean_one_at_a_time": loops["lean"].figures(),
                "generate_one_at_a_time": loops["generate"].figures(),
                "batch_over_lean_one_at_a_time": ratio(batched.figures(), loops["lean"].figures()),
                "batch_over_generate_one_at_a_time": ratio(batched.figures(), loops["generate"].figures()),
                "same_text_as_lean_one_at_a_time": _same(batch_answers, loop_answers["lean"]),
                "same_text_as_generate_one_at_a_time": _same(batch_answers, loop_answers["generate"])}
        print(mode, json.dumps(results[mode], indent=1), flush=True)
    results["guaranteed_valid_over_free_lean_single_stream"] = ratio(
        results["guaranteed_valid"]["single_stream"]["lean"], results["free"]["single_stream"]["lean"])
    for size in args.batch:
        key = f"batch_{size // len(requests) * len(requests)}"
        results[f"guaranteed_valid_over_free_lean_{key}"] = ratio(
            results["guaranteed_valid"][key]["lean_batch"], results["free"][key]["lean_batch"])
    threads = {}
    for count in (1, 2):
        tally = Tally()
        with _torch_threads(count):
            saved, lean.engine.threads = lean.engine.threads, count
            for i, request in enumerate(requests):
                tally.timed(lambda: lean.compose(request, seed=args.seed + i, **options))
            lean.engine.threads = saved
        threads[str(count)] = tally.figures()
    results["lean_single_stream_by_threads"] = threads
    results["load_average_at_end"] = round(os.getloadavg()[0], 2)
    results["torch"] = torch.__version__
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
