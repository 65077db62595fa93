"""Composer speed and validity, with and without guaranteed-valid (grammar-constrained) mode.

On the benchmark requests (every composing task; meters 2/4 3/4 4/4 6/8 9/8; continuations of
real tunes from music21's bundled corpus) IMelodist-tiny composes each request `--samples`
times in both modes, same seeds. Figures per mode: parse rate (a tune was extracted and
parses), valid rate (parses with no bar-length error), bar error rate (bars with a wrong
length / bars checked), completion tokens/s, tunes/s, and the median time to the first
rendered bar (first complete bar in the token stream). The overhead of constrained mode is
the ratio of the two tokens/s figures, measured in one run.

On a GPU with LMDeploy installed (not in CI) it also measures LMDeploy's decode tokens/s for
an InternLM2-7B-shaped model (`--lmdeploy-model DIR`) against the memory-bandwidth limit
(batch 1: every token reads every weight once).

    python benchmarks/bench_inference.py                 # CPU, IMelodist-tiny
    python benchmarks/bench_inference.py --samples 4 --model DIR
    python benchmarks/bench_inference.py --lmdeploy-model runs/gpu/sft/merged --bandwidth-gbs 3350
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imelodist_lib.inference import Composer, benchmark_requests, measure  # noqa: E402
from imelodist_lib.instructions import ComposeRequest  # noqa: E402
from imelodist_lib.profiles import SHIPPED_MODEL_DIR, get_profile  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "inference.json"


def lmdeploy_decode(model_dir: str | None, bandwidth_gbs: float, tokens: int = 256) -> dict:
    """LMDeploy batch-1 decode tokens/s against the weights-read-per-token limit (GPU only)."""
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("lmdeploy") is None:
        return {"skipped": "needs CUDA and lmdeploy (make lmdeploy-env; run on a GPU machine)"}
    if not model_dir:
        return {"skipped": "pass --lmdeploy-model DIR (an InternLM2-7B-shaped checkpoint)"}
    composer = Composer(model=model_dir, backend="lmdeploy", profile=get_profile("gpu"))
    request = ComposeRequest("emotion", emotion="欢快", meter="6/8", key="G")
    composer.compose(request, max_new_tokens=16, seed=0)  # warm-up
    [c] = composer.compose(request, max_new_tokens=tokens, seed=1, temperature=1.0)
    params = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")) / 2  # bf16 bytes
    limit = bandwidth_gbs * 1e9 / (params * 2)
    return {"model": model_dir, "decode_tokens_per_second": round(c.tokens_per_second, 1),
            "bandwidth_limit_tokens_per_second": round(limit, 1),
            "fraction_of_limit": round(c.tokens_per_second / limit, 3),
            "assumed_bandwidth_GBs": bandwidth_gbs, "parameters_estimated": int(params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHIPPED_MODEL_DIR), help="model dir (default IMelodist-tiny)")
    parser.add_argument("--samples", type=int, default=2, help="answers per request and mode")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--lmdeploy-model", default=None, help="GPU only: InternLM2-7B-shaped model dir")
    parser.add_argument("--bandwidth-gbs", type=float, default=3350.0, help="GPU memory bandwidth (H100 SXM)")
    args = parser.parse_args()

    profile = get_profile("cpu")
    composer = Composer(model=args.model, backend="transformers", profile=profile)
    requests = benchmark_requests()
    composer.compose(requests[0], max_new_tokens=8, seed=0)  # warm-up (first-call allocations)
    free = measure(composer, requests, args.samples, constrained=False, max_new_tokens=args.max_new_tokens)
    constrained = measure(composer, requests, args.samples, constrained=True,
                          max_new_tokens=args.max_new_tokens)
    results = {
        "command": "python " + " ".join(["benchmarks/bench_inference.py", *sys.argv[1:]]),
        "model": args.model,
        "parameters": sum(p.numel() for p in composer.engine.model.parameters()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "requests": len(requests),
        "samples_per_request": args.samples,
        "unconstrained": free,
        "constrained": constrained,
        "constrained_speed_ratio": round(constrained["tokens_per_second"] / free["tokens_per_second"], 3),
        "constrained_tunes_per_second_ratio": round(
            constrained["tunes_per_second"] / free["tunes_per_second"], 3),
        "lmdeploy_gpu": lmdeploy_decode(args.lmdeploy_model, args.bandwidth_gbs),
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
