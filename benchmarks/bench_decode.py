"""IMelodist-tiny decode speed: transformers' `generate` against the lean path (imelodist_lib.fast_decode).

In one run, on the same model and the same requests and seeds (the first `--requests` benchmark
requests), free and guaranteed-valid (xgrammar-constrained):
- single stream: one answer per `compose` call, `Composer(fast_decode=False)` (transformers'
  `generate`) against the lean path (NumPy forward, see fast_decode's docstring), in `--repeats`
  rounds; in each round every request runs its four cells (generate/lean x free/guaranteed-valid)
  in a rotating order, so a change in the machine's load hits all alike. Ratios are taken per
  round and the median is reported;
- batched: `--batch` answers (8 and 16: `batch // requests` samples per request) as one
  `compose_many` call, against the same answers made one at a time by `generate` and by the lean path;
- the lean path at 1 and 2 CPU threads, and the time to read the weights (its start-up cost).
Figures are completion tokens per wall second and per CPU second of this process (the CPU
figure is steadier on a shared machine: other jobs take wall time, not this process's CPU time);
`decode` figures count only the decode (Composition.seconds), not prompt building or checking.

    python benchmarks/bench_decode.py     # writes benchmarks/results/decode.json, decode.md, RESULTS.md
    python benchmarks/bench_decode.py --repeats 5 --max-new-tokens 256 --batch 8 16 32
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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
MODES = (("free", False), ("guaranteed_valid", True))


class Tally:
    """Completion tokens, wall, CPU and decode seconds summed over calls."""

    def __init__(self):
        self.tokens, self.wall, self.cpu, self.decode, self.answers = 0, 0.0, 0.0, 0.0, 0

    def timed(self, call):
        """Run `call()` (returning Compositions, flat or per request) and add its figures."""
        wall, cpu = time.perf_counter(), time.process_time()
        out = call()
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        flat = [c for item in out for c in (item if isinstance(item, list) else [item])]
        self.tokens += sum(c.completion_tokens for c in flat)
        self.decode += max(c.seconds for c in flat) if isinstance(out[0], list) and len(out) > 1 \
            else sum(c.seconds for c in flat)
        self.answers += len(flat)
        return flat

    def speeds(self) -> dict:
        return {"wall": self.tokens / self.wall, "cpu": self.tokens / self.cpu, "decode": self.tokens / self.decode}

    def figures(self) -> dict:
        s = self.speeds()
        return {"answers": self.answers, "completion_tokens": self.tokens, "wall_seconds": round(self.wall, 2),
                "tokens_per_second": round(s["wall"], 1), "tokens_per_cpu_second": round(s["cpu"], 1),
                "tokens_per_decode_second": round(s["decode"], 1)}


def ratio(a: Tally, b: Tally) -> dict:
    """a's speed over b's: per wall second, per CPU second, per decode second."""
    sa, sb = a.speeds(), b.speeds()
    return {k: round(sa[k] / sb[k], 2) for k in sa}


def median_ratio(pairs: list[tuple[Tally, Tally]]) -> dict:
    """The median over rounds of `ratio`, with each round's figures."""
    per_round = [ratio(a, b) for a, b in pairs]
    return {**{k: round(statistics.median(r[k] for r in per_round), 2) for k in per_round[0]},
            "rounds": per_round}


def _same(a: list, b: list) -> str:
    """How many answers of two lists have the same text, as 'k/n'."""
    return f"{sum(x.text == y.text for x, y in zip(a, b))}/{len(a)}"


def single_stream(composers: dict, requests: list, args) -> tuple[dict, dict]:
    """`args.repeats` rounds of the four single-stream cells per request, order rotating."""
    cells = [(engine, mode, constrained) for mode, constrained in MODES for engine in ("generate", "lean")]
    rounds, loads, texts = [], [], {}
    for r in range(args.repeats):
        tallies = {(e, m): Tally() for e, m, _ in cells}
        for i, request in enumerate(requests):
            k = (r + i) % len(cells)
            for engine, mode, constrained in cells[k:] + cells[:k]:
                [c] = tallies[engine, mode].timed(lambda: composers[engine].compose(
                    request, seed=args.seed + i, constrained=constrained, max_new_tokens=args.max_new_tokens))
                texts.setdefault((engine, mode), {})[i] = c.text
        rounds.append(tallies)
        loads.append(round(os.getloadavg()[0], 2))
    out: dict = {"load_average_after_each_round": loads}
    for mode, _ in MODES:
        out[mode] = {
            "generate": rounds[-1]["generate", mode].figures(), "lean": rounds[-1]["lean", mode].figures(),
            "lean_over_generate": median_ratio([(t["lean", mode], t["generate", mode]) for t in rounds]),
            "same_text_as_generate": f"{sum(texts['lean', mode][i] == texts['generate', mode][i] for i in texts['lean', mode])}"
                                     f"/{len(requests)}"}
    gv_over_free = median_ratio([(t["lean", "guaranteed_valid"], t["lean", "free"]) for t in rounds])
    gen_gv_over_free = median_ratio([(t["generate", "guaranteed_valid"], t["generate", "free"]) for t in rounds])
    return out, {"lean": gv_over_free, "generate": gen_gv_over_free}


def batched(composers: dict, requests: list, args, constrained: bool) -> dict:
    """Each batch size: one compose_many call against its answers made one at a time."""
    lean = composers["lean"]
    options = dict(max_new_tokens=args.max_new_tokens, constrained=constrained)
    out = {}
    for size in args.batch:
        samples = max(1, size // len(requests))
        loops = {"generate": Tally(), "lean": Tally()}
        loop_answers: dict[str, list] = {"generate": [], "lean": []}
        batch = Tally()
        batch_answers = batch.timed(lambda: lean.compose_many(requests, n=samples, seed=args.seed, **options))
        for i, request in enumerate(requests):  # the batch's own answers, one compose per answer
            for j in range(samples):
                for name, tally in loops.items():
                    loop_answers[name] += tally.timed(lambda: composers[name].compose(
                        request, n=1, seed=args.seed + i + j, **options))
        out[f"batch_{len(batch_answers)}"] = {
            "lean_batch": batch.figures(), "lean_one_at_a_time": loops["lean"].figures(),
            "generate_one_at_a_time": loops["generate"].figures(),
            "batch_over_lean_one_at_a_time": ratio(batch, loops["lean"]),
            "batch_over_generate_one_at_a_time": ratio(batch, loops["generate"]),
            "same_text_as_lean_one_at_a_time": _same(batch_answers, loop_answers["lean"]),
            "same_text_as_generate_one_at_a_time": _same(batch_answers, loop_answers["generate"])}
    return out


def lookup_draft(context: list[int], k: int, min_match: int, max_match: int = 4) -> list[int]:
    """Prompt-lookup draft: the k tokens that followed the latest earlier occurrence of the
    context's last n tokens (n = max_match down to min_match; the prompt and the answer so far)."""
    for n in range(max_match, min_match - 1, -1):
        tail = context[-n:]
        for j in range(len(context) - n - 1, -1, -1):
            if context[j:j + n] == tail:
                return context[j + n:j + n + k]
    return []


def speculation_replay(answers: list[tuple[list[int], list[int]]], k: int, min_match: int, cost: dict,
                       oracle: bool = False) -> dict:
    """Exact speculation replayed on (prompt, answer tokens) pairs: the answer is the same with or
    without it, so each verify step emits the draft's agreeing prefix plus one sampled token.
    cost[n]: a forward over n positions in one-position steps. oracle: draft only what would be
    accepted (the bound of any policy choosing when and how far to draft)."""
    steps = drafted = accepted = emitted = 0
    spent = 0.0
    for prompt, tokens in answers:
        context, i = [*prompt, tokens[0]], 1  # the first token comes from the prefill
        while i < len(tokens):
            draft = lookup_draft(context, min(k, len(tokens) - i - 1), min_match) if len(tokens) - i > 1 else []
            agree = next((a for a, t in enumerate(draft) if t != tokens[i + a]), len(draft))
            draft = draft[:agree] if oracle else draft
            steps, drafted, accepted, emitted = steps + 1, drafted + len(draft), accepted + agree, emitted + agree + 1
            spent += cost[1 + len(draft)]
            context += tokens[i:i + agree + 1]
            i += agree + 1
    return {"tokens_per_step": round(emitted / steps, 3), "draft_acceptance": round(accepted / max(drafted, 1), 3),
            "modeled_step_speedup": round(emitted / spent, 3)}


def speculation_study(composer: Composer, requests: list, args) -> dict:
    """Would exact prompt-lookup speculation pay on the lean single-row path? The bench's own
    answers (same seeds), the cost of a forward over 1..9 positions at once (`LeanLlama.prefill`
    with start > 0: the verify step) against the one-row step, and the replayed speedup."""
    from imelodist_lib.fast_decode import Sampling, blas_threads, decode

    engine = composer.engine
    lean, sampling = engine._lean_model(), Sampling(composer.profile.temperature, 0.95, 50, args.max_new_tokens)
    answers: dict = {}
    with _torch_threads(1):
        for mode, constrained in MODES:
            for i, request in enumerate(requests):
                grammar = grammar_for_request(request) if constrained else None
                rows = engine._lean_rows([(composer.messages_for(request), grammar, args.seed + i)], 1, None)
                [result] = decode(lean, rows, sampling, engine.stop_ids, utf8=engine.utf8_table)
                answers.setdefault(mode, []).append((rows[0].prompt, result.tokens))
        prompt, tokens = answers["free"][0]
        start = len(prompt) + len(tokens) // 2
        cache = lean.new_cache(1, start + 16)
        lean.prefill([*prompt, *tokens][:start], cache, 0)
        calls = {1: lambda: lean._step_one(5, start, cache)}
        calls.update({n: (lambda n=n: lean.prefill([5] * n, cache, 0, all_logits=True, start=start))
                      for n in range(2, 10)})
        seconds: dict = {n: [] for n in calls}
        with blas_threads(1):
            for _ in range(9):  # interleaved rounds, CPU time of 20 calls each, medians
                for n, call in calls.items():
                    clock = time.thread_time()
                    for _ in range(20):
                        call()
                    seconds[n].append((time.thread_time() - clock) / 20)
    one = statistics.median(seconds[1])
    cost = {n: round(statistics.median(v) / one, 2) for n, v in seconds.items()}
    out: dict = {"one_position_step_ms": round(one * 1e3, 3), "cost_of_n_positions_over_one": cost,
                 "load_average": round(os.getloadavg()[0], 2)}
    for mode in answers:
        replays = {f"min_match_{m}_k_{k}": speculation_replay(answers[mode], k, m, cost)
                   for m in (1, 2, 3) for k in (1, 2, 3, 4, 8)}
        best = max(replays, key=lambda key: replays[key]["modeled_step_speedup"])
        oracle = max((speculation_replay(answers[mode], k, 1, cost, oracle=True) for k in (1, 2, 4, 8)),
                     key=lambda r: r["modeled_step_speedup"])
        out[mode] = {"tokens": sum(len(t) for _, t in answers[mode]), "best": best, **replays,
                     "oracle_bound": oracle}
    return out


def markdown(results: dict) -> str:
    """decode.md: the ratios against their targets, then where the figures come from."""
    s, ratios = results["single_stream"], results["ratios"]
    rows = [("single stream, free: lean / generate", ratios["single_stream_free_lean_over_generate"], ">= 4"),
            ("single stream, guaranteed-valid: lean / generate",
             ratios["single_stream_guaranteed_valid_lean_over_generate"], ">= 4"),
            ("single stream, lean: free / guaranteed-valid (slowdown of the grammar)",
             ratios["single_stream_lean_free_over_guaranteed_valid"], "<= 1.1"),
            ("single stream, generate: free / guaranteed-valid",
             ratios["single_stream_generate_free_over_guaranteed_valid"], "(reference)")]
    for key, value in ratios.items():
        if key.startswith("batch_"):
            rows.append((key.replace("_", " "), value, ">= 4" if "generate" in key else "(reference)"))
    lines = [f"Command: `{results['command']}` ({results['date']}, {results['machine']}, torch {results['torch']}, "
             f"load average {results['load_average_at_start']} at start, "
             f"{s['load_average_after_each_round']} after each single-stream round, "
             f"{results['load_average_at_end']} at end: the machine is shared, so the CPU-second "
             "ratios are the steadier ones).", "",
             f"Lean path: {results['lean_path']}", "",
             "| ratio (medians over rounds for single stream) | per wall s | per CPU s | per decode s | target |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {v['wall']} | {v['cpu']} | {v['decode']} | {target} |" for name, v, target in rows]
    lines += ["", "| single stream (last round) | tokens/s wall | tokens/s CPU | same text as generate |",
              "|---|---|---|---|"]
    for mode, _ in MODES:
        for engine in ("generate", "lean"):
            f = s[mode][engine]
            lines.append(f"| {mode} {engine} | {f['tokens_per_second']} | {f['tokens_per_cpu_second']} | "
                         f"{s[mode]['same_text_as_generate'] if engine == 'lean' else ''} |")
    lines += ["", f"Weights read once: {results['lean_weights_read_seconds']} s. Lean path by CPU threads "
              f"(tokens per CPU second): " + ", ".join(f"{k}: {v['tokens_per_cpu_second']}" for k, v in
                                                        results["lean_single_stream_by_threads"].items()) + "."]
    study = results.get("speculation_study")
    if study:
        cost = study["cost_of_n_positions_over_one"]
        lines += ["", "Exact prompt-lookup speculation, replayed on the lean answers above (same seeds, so the "
                  "same answers with or without it; issue 15). A forward over n positions "
                  f"(`LeanLlama.prefill(..., start=)`) costs, in one-row steps of {study['one_position_step_ms']} ms "
                  f"(CPU time, load {study['load_average']}): " + ", ".join(f"n={n}: {c}" for n, c in cost.items())
                  + ". Draft: the k tokens after the latest earlier match of the last 4..m tokens.", "",
                  "| mode | tokens | policy | tokens per verify step | draft acceptance | modeled decode-step speedup |",
                  "|---|---|---|---|---|---|"]
        for mode, _ in MODES:
            m = study[mode]
            for name in (m["best"], "min_match_1_k_3", "min_match_2_k_8", "oracle_bound"):
                r = m[name]
                lines.append(f"| {mode} | {m['tokens']} | {name.replace('_', ' ')}"
                             f"{' (best)' if name == m['best'] else ''} | {r['tokens_per_step']} | "
                             f"{r['draft_acceptance']} | {r['modeled_step_speedup']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHIPPED_MODEL_DIR))
    parser.add_argument("--requests", type=int, default=4, help="benchmark requests used")
    parser.add_argument("--repeats", type=int, default=3, help="single-stream rounds (medians reported)")
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
    composers = {"generate": generate, "lean": lean}
    requests = benchmark_requests()[:args.requests]
    for composer in (lean, generate):  # warm-up: first-call allocations, grammar compilation
        for constrained in (False, True):
            composer.compose(requests[0], max_new_tokens=4, seed=0, constrained=constrained)
    for request in requests:  # every request's grammar compiled before timing (xgrammar caches it)
        compile_grammar(tokenizer, grammar_for_request(request), vocab_size=model.config.vocab_size)
    start = time.perf_counter()
    LeanLlama(model)
    read_seconds = time.perf_counter() - start

    results: dict = {"command": "python " + " ".join(["benchmarks/bench_decode.py", *sys.argv[1:]]),
                     "model": str(Path(args.model).relative_to(ROOT)) if Path(args.model).is_relative_to(ROOT)
                     else args.model,
                     "parameters": sum(p.numel() for p in model.parameters()),
                     "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
                     "load_average_at_start": round(os.getloadavg()[0], 2),
                     "threads": lean.engine.threads, "max_new_tokens": args.max_new_tokens,
                     "repeats": args.repeats, "lean_weights_read_seconds": round(read_seconds, 4),
                     "lean_path": "float32 forward: prefill by NumPy (OpenBLAS at 1 thread), each step one "
                                  "numba-compiled call for all its rows, KV cache preallocated, "
                                  "grammar masks filled in a worker thread during each step, single-row "
                                  "guaranteed-valid steps compute only the allowed tokens' logits"}
    single, gv_over_free = single_stream(composers, requests, args)
    results["single_stream"] = single
    print("single stream", json.dumps(single, indent=1), flush=True)
    for mode, constrained in MODES:
        results[mode] = batched(composers, requests, args, constrained)
        print(mode, json.dumps(results[mode], indent=1), flush=True)
    ratios = {"single_stream_free_lean_over_generate": single["free"]["lean_over_generate"],
              "single_stream_guaranteed_valid_lean_over_generate": single["guaranteed_valid"]["lean_over_generate"]}
    for engine in ("lean", "generate"):  # free over guaranteed-valid: how much the grammar slows decoding
        ratios[f"single_stream_{engine}_free_over_guaranteed_valid"] = {
            k: round(1 / v, 2) for k, v in gv_over_free[engine].items() if k != "rounds"}
    for mode, _ in MODES:
        for key, figures in results[mode].items():
            ratios[f"{key}_{mode}_over_generate_one_at_a_time"] = figures["batch_over_generate_one_at_a_time"]
            ratios[f"{key}_{mode}_over_lean_one_at_a_time"] = figures["batch_over_lean_one_at_a_time"]
    results["ratios"] = {k: {kk: vv for kk, vv in v.items() if kk != "rounds"} for k, v in ratios.items()}
    threads = {}
    for count in (1, 2):
        tally = Tally()
        with _torch_threads(count):
            saved, lean.engine.threads = lean.engine.threads, count
            for i, request in enumerate(requests):
                tally.timed(lambda: lean.compose(request, seed=args.seed + i, max_new_tokens=args.max_new_tokens))
            lean.engine.threads = saved
        threads[str(count)] = tally.figures()
    results["lean_single_stream_by_threads"] = threads
    results["speculation_study"] = speculation_study(lean, requests, args)
    print("speculation", json.dumps(results["speculation_study"], indent=1), flush=True)
    results["load_average_at_end"] = round(os.getloadavg()[0], 2)
    results["torch"] = torch.__version__
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    RESULTS.with_suffix(".md").write_text(markdown(results), encoding="utf-8")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run_all import collect  # RESULTS.md gathers every topic's results file

    (ROOT / "benchmarks" / "RESULTS.md").write_text(collect(), encoding="utf-8")
    print(json.dumps(results["ratios"], indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
