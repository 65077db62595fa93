"""Training benchmarks -> benchmarks/results/train.json.

CPU (always):
- tokenizer choice: tokens per validation tune, and validation loss in nats per *character*
  (comparable across vocabularies) after the same number of training steps, for the
  music-aware pre-tokenisation vs GPT-2's plain byte-level rule;
- throughput of IMelodist-tiny (forward + backward + AdamW step, tokens/s) for a plain batch
  (what "wrapped" packing feeds) vs a padding-free row (what best-fit packing feeds).
GPU (when CUDA is present): tokens/s and model FLOPs utilisation of a randomly initialised
InternLM2-7B-shaped Llama (bf16, gradient checkpointing, 4096-token sequences).

    python benchmarks/bench_train.py [--steps 25] [--seq 256] [--batch 8]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from imelodist_lib.instructions import load_datasets
from imelodist_lib.models import count_parameters, new_tiny_model, tokens_per_text, train_tokenizer
from imelodist_lib.profiles import get_profile

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts tokenised and joined with EOS, as wrapped packing does."""
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += row + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def train_steps(model, stream: torch.Tensor, steps: int, batch: int, seq: int, lr: float = 2e-3) -> float:
    """Plain AdamW steps on consecutive rows of the stream; returns seconds spent (after step 1)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rows = stream[: (len(stream) // seq) * seq].view(-1, seq)
    model.train()
    start = None
    for step in range(steps):
        if step == 1:
            start = time.perf_counter()  # step 0 warms up allocators and kernels
        idx = torch.arange(step * batch, (step + 1) * batch) % len(rows)
        x = rows[idx]
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


@torch.no_grad()
def nats_per_char(model, tokenizer, texts: list[str], seq: int) -> float:
    """Validation cross-entropy summed over tokens, divided by characters."""
    model.eval()
    total, chars = 0.0, 0
    for text in texts:
        ids = tokenizer(text + tokenizer.eos_token, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :seq]
        out = model(input_ids=ids, labels=ids, use_cache=False)
        total += out.loss.item() * (ids.shape[1] - 1)
        chars += len(tokenizer.decode(ids[0]))
    return total / chars


def step_tokens_per_second(model, batch: int, seq: int, padding_free: bool, repeats: int = 3) -> float:
    """Forward + backward + AdamW on random tokens: a plain [batch, seq] batch or one flattened row."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    kwargs = {}
    if padding_free:
        ids = ids.reshape(1, -1)
        kwargs["position_ids"] = torch.arange(seq).repeat(batch).unsqueeze(0)
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        model(input_ids=ids, labels=ids, use_cache=False, **kwargs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    return batch * seq / (sum(times) / len(times))


def cpu_bench(steps: int, batch: int, seq: int) -> dict:
    profile = get_profile("cpu")
    data = load_datasets(profile, progress=False)["pt"]
    train_texts = data["train"]["text"]
    val_texts = data["validation"]["text"][:48]
    vocab = profile.tokenizer_vocab_size
    out: dict = {"tokenizer": {}, "threads": torch.get_num_threads()}
    for name, aware in (("music_aware", True), ("plain_byte_level", False)):
        tok = train_tokenizer(train_texts, vocab, music_aware=aware)
        torch.manual_seed(0)
        model = new_tiny_model(tok)
        stream = token_stream(tok, train_texts[:4000])
        secs = train_steps(model, stream, steps, batch, seq)
        out["tokenizer"][name] = {
            "tokens_per_val_tune": round(tokens_per_text(tok, data["validation"]["text"]), 1),
            "chars_per_token": round(sum(map(len, val_texts)) / sum(len(t) for t in tok(val_texts)["input_ids"]), 3),
            f"val_nats_per_char_after_{steps}_steps": round(nats_per_char(model, tok, val_texts, 1024), 4),
            "train_tokens_per_s": round((steps - 1) * batch * seq / secs),
        }
    torch.manual_seed(0)
    model = new_tiny_model(tok)
    out["params"] = count_parameters(model)
    plain = step_tokens_per_second(model, 8, 512, padding_free=False)
    flat = step_tokens_per_second(model, 8, 512, padding_free=True)
    out["throughput_8x512"] = {"plain_batch_tokens_per_s": round(plain),
                               "padding_free_row_tokens_per_s": round(flat),
                               "padding_free_slowdown": round(plain / flat, 2)}
    return out


def gpu_bench(seq: int = 4096, batch: int = 1, steps: int = 6) -> dict:
    """Random InternLM2-7B-shaped Llama, bf16, gradient checkpointing: tokens/s and MFU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=92544, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rms_norm_eps=1e-5,
                      use_cache=False)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    times = []
    for i in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    n = count_parameters(model)
    tokens_per_s = batch * seq / (sum(times) / len(times))
    # model FLOPs per token: 6N for the weights + 12 * layers * hidden * seq for attention (PaLM's formula);
    # gradient checkpointing recomputes the forward, which is not counted (hardware FLOPs would be 8N)
    flops_per_token = 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq
    name = torch.cuda.get_device_name()
    peak = 989e12 if "H100" in name or "H200" in name else 312e12 if "A100" in name else float("nan")
    return {"device": name, "params": n, "seq": seq, "batch": batch, "tokens_per_s": round(tokens_per_s),
            "mfu": round(tokens_per_s * flops_per_token / peak, 3) if not math.isnan(peak) else None,
            "peak_bf16_flops_assumed": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    result = {"command": "python " + " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "cpu": cpu_bench(args.steps, args.batch, args.seq)}
    result["gpu"] = gpu_bench() if torch.cuda.is_available() else "not run: no CUDA device on this machine"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
