"""InternLM2 written from its equations, and the zh/en/ABC text its test tokenizer learns from.

Shared by test_models.py (the converter on a hand-made checkpoint) and test_internlm2.py (the
hub-layout fixture end to end), so both check against one reference.
"""
from __future__ import annotations

from pathlib import Path

import music21
import torch

from imelodist_lib.profiles import KNOWLEDGE_DIR


def internlm2_reference_logits(state: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """InternLM2's forward pass from its equations, reading the fused wqkv the way InternLM2 does."""
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, groups, eps = h // heads, heads // kv, cfg["rms_norm_eps"]
    T = ids.shape[1]

    def rms(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    inv_freq = 1.0 / cfg["rope_theta"] ** (torch.arange(0, d, 2).float() / d)
    freqs = torch.outer(torch.arange(T).float(), inv_freq)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def rotate(x):  # rotate_half convention, as InternLM2's modeling code
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = state["model.tok_embeddings.weight"][ids]
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(x, state[p + "attention_norm.weight"])
        qkv = (a @ state[p + "attention.wqkv.weight"].T).view(1, T, kv, groups + 2, d)
        q = qkv[..., :groups, :].reshape(1, T, heads, d).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2).repeat_interleave(groups, dim=1)
        v = qkv[..., -1, :].transpose(1, 2).repeat_interleave(groups, dim=1)
        q, k = rotate(q), rotate(k)
        att = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5 + causal, dim=-1)
        out = (att @ v).transpose(1, 2).reshape(1, T, heads * d)
        x = x + out @ state[p + "attention.wo.weight"].T
        f = rms(x, state[p + "ffn_norm.weight"])
        gate = torch.nn.functional.silu(f @ state[p + "feed_forward.w1.weight"].T)
        x = x + (gate * (f @ state[p + "feed_forward.w3.weight"].T)) @ state[p + "feed_forward.w2.weight"].T
    return rms(x, state["model.norm.weight"]) @ state["output.weight"].T


def knowledge_texts() -> list[str]:
    """The project's zh/en knowledge files (data/knowledge/*.md|tsv|jsonl), one string each."""
    return [p.read_text(encoding="utf-8") for p in sorted(KNOWLEDGE_DIR.iterdir())
            if p.suffix in (".md", ".tsv", ".jsonl")]


def oneills_tunes() -> list[str]:
    """All ABC tunes of music21's O'Neill's 1850 collection, in file order."""
    folder = Path(music21.__file__).parent / "corpus" / "oneills1850"
    tunes: list[str] = []
    for path in sorted(folder.glob("*.abc")):
        tunes += ["X:" + t.strip() for t in path.read_text(encoding="latin-1").split("\nX:")[1:]]
    return tunes
