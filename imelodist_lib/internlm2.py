"""InternLM2 without remote code: its hub layout, its SentencePiece tokenizer, and a one-time Llama copy.

transformers 5 has no native InternLM2, and the hub checkpoints' own code (modeling_internlm2.py,
tokenization_internlm2.py) uses APIs transformers 5 removed. InternLM2 is a Llama with a fused
wqkv and other tensor names, so `ensure_llama_checkpoint` rewrites a checkpoint once into a plain
Llama folder (weights split and renamed, a fast `tokenizer.json` built from `tokenizer.model`
with every special token at its id, CHAT_TEMPLATE, no auto_map) and caches it; loading then
runs no code from the checkpoint.

- `write_internlm2_checkpoint` / `train_sentencepiece_model`: a tiny random checkpoint in exactly
  the hub's layout (its code files raise if imported), for tests and rehearsals.
- `sentencepiece_to_fast`: tokenizer.model -> `tokenizers.Tokenizer` giving SentencePiece's ids.
- `convert_internlm2_to_llama`, `ensure_llama_checkpoint`: the conversion and its cache.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from imelodist_lib.models import BOS, CHAT_TEMPLATE, EOS, IM_END, IM_START, _offline_message

UNK = "<unk>"
# InternLM2-chat's added special tokens; the real vocabulary holds them at 92543 down to 92538
INTERNLM2_SPECIAL_TOKENS = [IM_START, IM_END, "<|action_start|>", "<|action_end|>",
                            "<|interpreter|>", "<|plugin|>"]
CODE_FILES = ["configuration_internlm2.py", "modeling_internlm2.py", "tokenization_internlm2.py",
              "tokenization_internlm2_fast.py"]
CACHE_ENV = "IMELODIST_CONVERTED_CACHE"
# bump when the converted layout changes, so old caches are not reused
CONVERTER_VERSION = "1"

# ---------------------------------------------------------------- weights and config

_RENAMES = [
    (re.compile(r"^model\.tok_embeddings\."), "model.embed_tokens."),
    (re.compile(r"\.attention\.wo\."), ".self_attn.o_proj."),
    (re.compile(r"\.feed_forward\.w1\."), ".mlp.gate_proj."),
    (re.compile(r"\.feed_forward\.w3\."), ".mlp.up_proj."),
    (re.compile(r"\.feed_forward\.w2\."), ".mlp.down_proj."),
    (re.compile(r"\.attention_norm\."), ".input_layernorm."),
    (re.compile(r"\.ffn_norm\."), ".post_attention_layernorm."),
    (re.compile(r"^output\."), "lm_head."),
]


def llama_config_from_internlm2(cfg: dict):
    """Map an InternLM2 config.json dict to the equivalent LlamaConfig."""
    from transformers import LlamaConfig

    if cfg.get("bias"):
        raise ValueError("this InternLM2 checkpoint uses biases (bias=true); the Llama layout "
                         "converter handles the bias-free InternLM2 models only")
    rope = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    scaling = cfg.get("rope_scaling")
    if scaling:
        kind = scaling.get("type") or scaling.get("rope_type")
        # InternLM2's "dynamic" is HF's dynamic NTK (same formula); "linear" is HF's linear
        rope = {**rope, "rope_type": kind, "factor": float(scaling["factor"])}
    return LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_parameters=rope,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        bos_token_id=cfg.get("bos_token_id", 1), eos_token_id=cfg.get("eos_token_id", 2),
        pad_token_id=cfg.get("pad_token_id"), attention_bias=False,
        torch_dtype=cfg.get("torch_dtype", "bfloat16"))


def split_wqkv(wqkv: torch.Tensor, num_heads: int, num_kv_heads: int,
               head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split InternLM2's fused wqkv, laid out per kv group as [q_1..q_g, k, v], into q, k, v."""
    per_group = num_heads // num_kv_heads
    hidden = wqkv.shape[-1]
    w = wqkv.reshape(num_kv_heads, per_group + 2, head_dim, hidden)
    q = w[:, :per_group].reshape(num_heads * head_dim, hidden)
    k = w[:, -2].reshape(num_kv_heads * head_dim, hidden)
    v = w[:, -1].reshape(num_kv_heads * head_dim, hidden)
    return q.contiguous(), k.contiguous(), v.contiguous()


def random_internlm2_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights under InternLM2's own tensor names and shapes (fused grouped wqkv)."""
    g = torch.Generator().manual_seed(seed)
    h, inter, heads, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], \
        cfg["num_key_value_heads"]
    d = h // heads

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    state = {"model.tok_embeddings.weight": w(cfg["vocab_size"], h),
             "model.norm.weight": 1 + w(h), "output.weight": w(cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state.update({p + "attention.wqkv.weight": w((heads + 2 * kv) * d, h),
                      p + "attention.wo.weight": w(h, heads * d),
                      p + "feed_forward.w1.weight": w(inter, h), p + "feed_forward.w3.weight": w(inter, h),
                      p + "feed_forward.w2.weight": w(h, inter),
                      p + "attention_norm.weight": 1 + w(h), p + "ffn_norm.weight": 1 + w(h)})
    return state


def _weight_shards(src: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [src / f for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (src / single).is_file():
            return [src / single]
    raise FileNotFoundError(f"{src} has no weights (model.safetensors[.index.json] or "
                            "pytorch_model.bin[.index.json]): pass an InternLM2 checkpoint directory")


def load_state(src: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (every shard, .safetensors or .bin) in one dict."""
    state: dict[str, torch.Tensor] = {}
    for shard in _weight_shards(Path(src)):
        state.update(_load_shard(shard))
    return state


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def convert_internlm2_state_dict(state: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """Rename InternLM2 tensors to Llama names and split each fused wqkv into q/k/v projections."""
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg["hidden_size"] // heads
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith("attention.wqkv.weight"):
            prefix = key[: -len("attention.wqkv.weight")]
            q, k, v = split_wqkv(tensor, heads, kv, head_dim)
            out[prefix + "self_attn.q_proj.weight"] = q
            out[prefix + "self_attn.k_proj.weight"] = k
            out[prefix + "self_attn.v_proj.weight"] = v
            continue
        if "rotary_emb.inv_freq" in key:
            continue  # recomputed by Llama from rope_theta
        new = key
        for pattern, repl in _RENAMES:
            new = pattern.sub(repl, new)
        out[new] = tensor.contiguous()
    return out


def is_internlm2_checkpoint(directory: str | Path) -> bool:
    """True when a folder's config.json names InternLM2 (model_type or architecture)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return False
    cfg = json.loads(path.read_text(encoding="utf-8"))
    return cfg.get("model_type") == "internlm2" or "InternLM2ForCausalLM" in cfg.get("architectures", [])


def remote_code_files(directory: str | Path) -> list[str]:
    """The Python files a folder's auto_map entries (config and tokenizer config) would run."""
    files: set[str] = set()
    for name in ("config.json", "tokenizer_config.json"):
        path = Path(directory) / name
        if path.is_file():
            for ref in json.loads(path.read_text(encoding="utf-8")).get("auto_map", {}).values():
                for item in ref if isinstance(ref, list) else [ref]:
                    if item:
                        files.add(item.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return sorted(files)


def convert_internlm2_to_llama(src_dir: str | Path, dst_dir: str | Path) -> Path:
    """Convert an InternLM2 checkpoint into a plain Llama one: config, safetensors shards, tokenizer.

    With a `tokenizer.model` the tokenizer becomes a fast `tokenizer.json` (`save_fast_tokenizer`);
    without one, the tokenizer json files are copied without their auto_map. No file of `src_dir`
    is executed.
    """
    from safetensors.torch import save_file

    src, dst = Path(src_dir), Path(dst_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json: pass an InternLM2 checkpoint directory")
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if "wqkv" not in json.dumps(cfg) and cfg.get("model_type") != "internlm2":
        raise ValueError(f"{src}/config.json is not an InternLM2 config (model_type="
                         f"{cfg.get('model_type')!r}); nothing to convert")
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    shards = _weight_shards(src)
    for i, shard in enumerate(shards, start=1):
        converted = convert_internlm2_state_dict(_load_shard(shard), cfg)
        if cfg.get("tie_word_embeddings"):
            converted.pop("lm_head.weight", None)
        name = ("model.safetensors" if len(shards) == 1
                else f"model-{i:05d}-of-{len(shards):05d}.safetensors")
        save_file(converted, str(dst / name), metadata={"format": "pt"})
        for key, tensor in converted.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
        del converted
    if len(shards) > 1:
        (dst / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    llama = llama_config_from_internlm2(cfg)
    llama.architectures = ["LlamaForCausalLM"]
    llama.save_pretrained(dst)
    if (src / "tokenizer.model").is_file():
        tokenizer = save_fast_tokenizer(src, dst, model_max_length=cfg.get("max_position_embeddings"))
        _write_generation_config(src, dst, tokenizer.convert_tokens_to_ids(IM_END))
    else:
        for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                     "generation_config.json"):
            if (src / name).is_file():
                data = json.loads((src / name).read_text(encoding="utf-8"))
                data.pop("auto_map", None)
                (dst / name).write_text(json.dumps(data, indent=2, ensure_ascii=False))
    return dst


def _write_generation_config(src: Path, dst: Path, im_end_id: int) -> None:
    cfg = {}
    if (src / "generation_config.json").is_file():
        cfg = json.loads((src / "generation_config.json").read_text(encoding="utf-8"))
    eos = cfg.get("eos_token_id", 2)
    eos = [eos] if isinstance(eos, int) else list(eos)
    if im_end_id not in eos:
        eos.append(im_end_id)  # chat answers end with <|im_end|>
    out = {"bos_token_id": cfg.get("bos_token_id", 1), "eos_token_id": eos,
           "pad_token_id": cfg.get("pad_token_id", 2)}
    (dst / "generation_config.json").write_text(json.dumps(out, indent=2))


# ---------------------------------------------------------------- the SentencePiece tokenizer

def train_sentencepiece_model(texts: Iterable[str], path: str | Path, vocab_size: int = 2000,
                              character_coverage: float = 0.9995) -> Path:
    """Train a SentencePiece BPE model set up as InternLM2's tokenizer.model is, with its special tokens.

    As InternLM2's: BPE, byte fallback (no <unk> ever), digits split, whitespace kept as is (no
    extra-space removal, identity normalisation, whitespace-only pieces allowed) and no dummy
    prefix: InternLM2 encodes "<s><|im_start|>user\\n" as [1, 92543, 1008, 364], with no "▁"
    inserted after a special token. <unk>=0, <s>=1, </s>=2; the six chat tokens are
    user-defined symbols, so SentencePiece itself keeps each one whole. Characters outside
    `character_coverage` of the text are left to byte fallback.
    """
    import sentencepiece as spm

    # SentencePiece skips sentences over max_sentence_length bytes: feed paragraphs
    chunks = [piece for text in texts for piece in re.split(r"(?<=\n)\n+", text) if piece.strip()]
    if not chunks:
        raise ValueError("train_sentencepiece_model got no texts")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chunks), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=character_coverage, byte_fallback=True, split_digits=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, user_defined_symbols=INTERNLM2_SPECIAL_TOKENS,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=16384,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def _load_proto(tokenizer_model: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer_model).read_bytes())
    return proto


def sentencepiece_to_fast(tokenizer_model: str | Path, added_tokens: dict[int, str] | None = None):
    """A `tokenizers.Tokenizer` whose ids equal SentencePiece's for a BPE tokenizer.model.

    The BPE runs over the whole text with no pre-tokenizer, as SentencePiece's does; a Metaspace
    pre-tokenizer (the usual Llama conversion) splits before every "▁" and so can never emit
    SentencePiece's whitespace-run pieces. Merges are ranked by the merged piece's score, ties
    left to right, as in SentencePiece. `added_tokens` ({id: text}, from tokenizer_config's
    added_tokens_decoder) replace the piece at their id, as InternLM2's unused slots are.
    Tested on InternLM2's settings (identity normalisation, no dummy prefix, no extra-space
    removal); with a dummy prefix the "▁" goes before each run of text between special tokens.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    proto = _load_proto(Path(tokenizer_model))
    if proto.trainer_spec.model_type != 2:  # BPE
        raise ValueError(f"{tokenizer_model} is not a BPE SentencePiece model (InternLM2's is BPE)")
    added_tokens = dict(added_tokens or {})
    NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4
    vocab: dict[str, int] = {}
    normal: dict[str, tuple[float, int]] = {}
    specials: list[tuple[int, str]] = []
    for i, piece in enumerate(proto.pieces):
        text = added_tokens.get(i, piece.piece)
        vocab[text] = i
        if i in added_tokens or piece.type in (UNKNOWN, CONTROL, USER_DEFINED):
            specials.append((i, text))
        elif piece.type == NORMAL:
            normal[text] = (piece.score, i)
        # byte and unused pieces keep their id and never appear in a merge
    merges = []
    for text, (score, i) in normal.items():
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in normal and right in normal:
                merges.append(((-score, i, normal[left][1], normal[right][1]), (left, right)))
    merges = [pair for _, pair in sorted(merges)]
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True,
                               byte_fallback=proto.trainer_spec.byte_fallback))
    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    parts = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        parts.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(parts)
    # control, user-defined and added tokens are matched whole before the BPE, as SentencePiece does
    tok.add_special_tokens([AddedToken(text, special=True, normalized=False) for _, text in specials])
    for i, text in specials:
        if tok.token_to_id(text) != i:
            raise ValueError(f"special token {text!r} would move from id {i} to "
                             f"{tok.token_to_id(text)}: the tokenizer.model and tokenizer_config disagree")
    return tok


def _added_tokens_decoder(src: Path) -> dict[int, str]:
    path = src / "tokenizer_config.json"
    if not path.is_file():
        return {}
    decoder = json.loads(path.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
    return {int(i): entry["content"] for i, entry in decoder.items()}


def save_fast_tokenizer(src: str | Path, dst: str | Path, model_max_length: int | None = None):
    """Write dst/tokenizer.json (+ tokenizer_config.json, no auto_map) built from src/tokenizer.model."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    src, dst = Path(src), Path(dst)
    tok = sentencepiece_to_fast(src / "tokenizer.model", _added_tokens_decoder(src))
    bos_id = tok.token_to_id(BOS)
    # InternLM2's tokenizer adds <s> (add_bos_token=True); chat templates render it themselves
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    extra = [t for t in INTERNLM2_SPECIAL_TOKENS if tok.token_to_id(t) is not None]
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS,
        additional_special_tokens=extra, clean_up_tokenization_spaces=False,
        model_max_length=model_max_length or 32768)
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(dst)
    return wrapped


# ---------------------------------------------------------------- a hub-layout checkpoint

def write_internlm2_checkpoint(directory: str | Path, tokenizer_model: str | Path, *,
                               hidden_size: int = 64, num_hidden_layers: int = 2,
                               num_attention_heads: int = 4, num_key_value_heads: int = 2,
                               intermediate_size: int = 128, max_position_embeddings: int = 512,
                               rope_theta: float = 1000000.0, rope_scaling: dict | None = None,
                               rms_norm_eps: float = 1e-5, seed: int = 0,
                               dtype: torch.dtype = torch.float32, shards: int = 1,
                               safetensors: bool = True) -> Path:
    """A random InternLM2 checkpoint in exactly internlm/internlm2-chat-7b's layout (code files raise).

    config.json (model_type internlm2, auto_map), the remote-code files (each raises
    RuntimeError on import: loading must never run them), weights under InternLM2's tensor names
    in one or `shards` files (.safetensors or .bin, with an index when sharded), tokenizer.model,
    tokenizer_config.json (InternLM2Tokenizer, auto_map, added_tokens_decoder at the ids the
    SentencePiece model gives the chat tokens) and generation_config.json.
    """
    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    ids = {t: sp.piece_to_id(t) for t in [UNK, BOS, EOS, *INTERNLM2_SPECIAL_TOKENS]}
    missing = [t for t, i in ids.items() if i == sp.unk_id() and t != UNK]
    if missing:
        raise ValueError(f"{tokenizer_model} lacks InternLM2's tokens {missing}: train it with "
                         "train_sentencepiece_model")
    cfg = {"architectures": ["InternLM2ForCausalLM"],
           "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                        "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                        "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
           "bias": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
           "hidden_size": hidden_size, "initializer_range": 0.02,
           "intermediate_size": intermediate_size, "max_position_embeddings": max_position_embeddings,
           "model_type": "internlm2", "num_attention_heads": num_attention_heads,
           "num_hidden_layers": num_hidden_layers, "num_key_value_heads": num_key_value_heads,
           "pad_token_id": 2, "rms_norm_eps": rms_norm_eps, "rope_scaling": rope_scaling,
           "rope_theta": rope_theta, "tie_word_embeddings": False,
           "torch_dtype": str(dtype).removeprefix("torch."), "transformers_version": "4.41.0",
           "use_cache": True, "vocab_size": sp.get_piece_size()}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in CODE_FILES:
        (directory / name).write_text(
            f'raise RuntimeError("remote code executed: {name} must never be imported")\n')
    state = {k: v.to(dtype) for k, v in random_internlm2_state(cfg, seed).items()}
    _write_shards(directory, state, shards, safetensors)
    shutil.copyfile(tokenizer_model, directory / "tokenizer.model")
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    tokenizer_config = {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": t, **entry}
                                 for t, i in sorted(ids.items(), key=lambda kv: kv[1])},
        "additional_special_tokens": INTERNLM2_SPECIAL_TOKENS,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": BOS, "chat_template": (
            "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' "
            "+ message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|im_start|>assistant\n' }}{% endif %}"),
        "clean_up_tokenization_spaces": False, "decode_with_prefix_space": False, "eos_token": EOS,
        "model_max_length": 1000000000000000019884624838656, "pad_token": EOS, "sp_model_kwargs": None,
        "tokenizer_class": "InternLM2Tokenizer", "unk_token": UNK}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": INTERNLM2_SPECIAL_TOKENS, "bos_token": BOS, "eos_token": EOS,
         "pad_token": EOS, "unk_token": UNK}, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, ids[IM_END]], "pad_token_id": 2}, indent=2))
    return directory


def _write_shards(directory: Path, state: dict[str, torch.Tensor], shards: int, safetensors: bool) -> None:
    from safetensors.torch import save_file

    keys = sorted(state)
    groups = [keys[i * len(keys) // shards:(i + 1) * len(keys) // shards] for i in range(shards)]
    stem, ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
    weight_map, total = {}, 0
    for i, group in enumerate(groups, start=1):
        name = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k].contiguous() for k in group}
        if safetensors:
            save_file(part, str(directory / name), metadata={"format": "pt"})
        else:
            torch.save(part, directory / name)
        weight_map.update({k: name for k in group})
        total += sum(t.numel() * t.element_size() for t in part.values())
    if shards > 1:
        (directory / f"{stem}.{ext}.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# ---------------------------------------------------------------- the converted cache

def default_cache_dir() -> Path:
    """Where converted checkpoints live: $IMELODIST_CONVERTED_CACHE or ~/.cache/imelodist/converted."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "imelodist" / "converted")


def _source_fingerprint(src: Path) -> str:
    """A short hash of what the conversion reads: config and tokenizer files, weight names/sizes/mtimes."""
    h = hashlib.sha256(CONVERTER_VERSION.encode())
    for name in ("config.json", "tokenizer_config.json", "generation_config.json", "tokenizer.model"):
        if (src / name).is_file():
            h.update(name.encode() + (src / name).read_bytes())
    for shard in _weight_shards(src):
        stat = shard.stat()
        h.update(f"{shard.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def resolve_hub_id(repo_id: str) -> Path:
    """The local snapshot folder of a hub id, from the HF cache first; offline misses say how to fix."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        if offline or constants.HF_HUB_OFFLINE:
            raise OSError(_offline_message(repo_id)) from err
    try:  # online: the config, tokenizer and safetensors weights (.bin only when there are none)
        folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.model", "*.safetensors",
                                                                 "*.py", "*.txt", "*.jinja"]))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, allow_patterns=["*.bin", "*.json"]))
        return folder
    except Exception as err:  # network, auth, missing repo: one message that says what to do
        raise OSError(_offline_message(repo_id)) from err


def ensure_llama_checkpoint(path_or_id: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A plain Llama copy of an InternLM2 checkpoint, converted once and cached; later calls look it up.

    `path_or_id` is an InternLM2 folder or a hub id (resolved from the local HF cache, see
    `resolve_hub_id`). The copy lives in `cache_dir`, else $IMELODIST_CONVERTED_CACHE, else
    ~/.cache/imelodist/converted, as `<name>-<hash>`: the hash covers the source's config,
    tokenizer and weight file names, sizes and mtimes, so a changed source converts again. The
    copy is written to a temporary folder there and renamed when complete, so an interrupted
    conversion leaves no half copy (only a `.partial-*` folder, removed a day later). Clear the cache
    by deleting that folder (`rm -rf ~/.cache/imelodist/converted`).
    """
    name = str(path_or_id)
    src = Path(name).expanduser()
    if not src.is_dir():
        src = resolve_hub_id(name)
    if not is_internlm2_checkpoint(src):
        raise ValueError(f"{src} is not an InternLM2 checkpoint (its config.json names no internlm2): "
                         "load it with models.load_model directly")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    label = re.sub(r"[^\w.-]+", "--", src.name if Path(name).expanduser().is_dir() else name)
    target = root / f"{label}-{_source_fingerprint(src)}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".partial-*"):  # left by a killed conversion a day or more ago
        if time.time() - stale.stat().st_mtime > 86400:
            shutil.rmtree(stale, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    try:
        convert_internlm2_to_llama(src, partial)
        (partial / "converted_from.json").write_text(json.dumps(
            {"source": str(src), "converter_version": CONVERTER_VERSION}, indent=2))
        try:
            partial.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target
