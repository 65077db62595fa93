"""internlm2.py: a hub-layout InternLM2 loads as a plain Llama, with SentencePiece's ids, no remote code.

The fixture checkpoint (conftest.py) is laid out as internlm/internlm2-chat-7b is, and its
configuration/modeling/tokenization files raise RuntimeError when imported, so any test that
loads it also proves no code from the checkpoint ran.
"""
from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from imelodist_lib import internlm2
from imelodist_lib.internlm2 import (
    INTERNLM2_SPECIAL_TOKENS,
    ensure_llama_checkpoint,
    load_state,
    write_internlm2_checkpoint,
)
from imelodist_lib.models import CHAT_TEMPLATE, IM_END, load_model, model_source
from internlm2_reference import internlm2_reference_logits, knowledge_texts, oneills_tunes

# strings SentencePiece's whitespace handling and byte fallback are tested on
TRICKY = ["a  b", "   x", "x    ", "  two   three    four     five", "\t\tindent\tme", "a\n\n\nb",
          " \n \n", "  \t \n  ", "12345 67.89 0001", "3/4 6/8 120", "🎵🎶 music 🎼", "𠀀𠀁 rare 龘",
          "Ünïcödé ça", "K:G\n|:GAB  cde|]\n", "这是  两个空格", "。，、；：？！", "x\u3000y", "😀" * 3,
          "def f(x):\n    return x  # four spaces", "", " ", "\n", "tab\there", "end with space "]


def probe_strings() -> list[str]:
    """>= 500 zh/en/ABC strings: knowledge lines, held-out tunes, whitespace runs, digits, rare chars."""
    lines = [line for text in knowledge_texts() for line in text.split("\n") if line.strip()]
    tunes = oneills_tunes()[300:500]  # the tokenizer trained on the first 300
    spaced = [t.replace(" ", "   ").replace("|", " |\t") for t in tunes[:50]]
    return lines[::2] + tunes + spaced + TRICKY


@pytest.fixture(scope="module")
def sp(internlm2_checkpoint):
    return spm.SentencePieceProcessor(model_file=str(internlm2_checkpoint / "tokenizer.model"))


@pytest.fixture()
def cache_env(internlm2_converted, monkeypatch):
    """load_model's default cache pointed at the fixture's, so loading is a lookup."""
    monkeypatch.setenv(internlm2.CACHE_ENV, str(internlm2_converted.parent))
    return internlm2_converted.parent


@pytest.fixture(scope="module")
def loaded(internlm2_converted, internlm2_checkpoint):
    """(model, tokenizer) as load_model gives them for the hub-layout folder (a cache lookup)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(internlm2.CACHE_ENV, str(internlm2_converted.parent))
        return load_model(internlm2_checkpoint)


# ---------------------------------------------------------------- the layout

def test_fixture_has_the_hub_layout(internlm2_checkpoint, sp):
    cfg = json.loads((internlm2_checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "internlm2" and cfg["architectures"] == ["InternLM2ForCausalLM"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm2.InternLM2ForCausalLM"
    keys = set(load_state(internlm2_checkpoint))
    assert {"model.tok_embeddings.weight", "output.weight", "model.norm.weight",
            "model.layers.1.attention.wqkv.weight", "model.layers.1.feed_forward.w2.weight"} <= keys
    assert (internlm2_checkpoint / "model.safetensors.index.json").is_file()
    tok_cfg = json.loads((internlm2_checkpoint / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "InternLM2Tokenizer" and "auto_map" in tok_cfg
    # the chat tokens sit where the SentencePiece model defines them, as user-defined symbols
    for i, entry in tok_cfg["added_tokens_decoder"].items():
        assert sp.piece_to_id(entry["content"]) == int(i)
    for token in INTERNLM2_SPECIAL_TOKENS:
        i = sp.piece_to_id(token)
        assert i > 2 and not (sp.is_control(i) or sp.is_unused(i) or sp.is_unknown(i))
    assert [sp.unk_id(), sp.bos_id(), sp.eos_id()] == [0, 1, 2]
    for name in internlm2.CODE_FILES:  # the trap is armed: importing any of them raises
        with pytest.raises(RuntimeError, match="remote code executed"):
            runpy.run_path(str(internlm2_checkpoint / name))


def test_converted_folder_is_plain_llama(internlm2_converted, sp):
    cfg = json.loads((internlm2_converted / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg
    tok_cfg = json.loads((internlm2_converted / "tokenizer_config.json").read_text())
    assert "auto_map" not in tok_cfg and "InternLM2" not in json.dumps(tok_cfg)
    assert not list(internlm2_converted.glob("*.py")) and (internlm2_converted / "tokenizer.json").is_file()
    generation = json.loads((internlm2_converted / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, sp.piece_to_id(IM_END)]


# ---------------------------------------------------------------- the tokenizer

def test_fast_ids_equal_sentencepiece(loaded, sp):
    _, tokenizer = loaded
    strings = probe_strings()
    equal = sum(tokenizer(s, add_special_tokens=False)["input_ids"] == sp.encode(s) for s in strings)
    assert len(strings) >= 500
    assert equal == len(strings), f"{len(strings) - equal} of {len(strings)} strings differ"
    # byte fallback and whitespace-run pieces were really exercised
    ids = [i for s in TRICKY for i in sp.encode(s)]
    assert any(sp.is_byte(i) for i in ids)
    assert any(set(sp.id_to_piece(i)) == {"▁"} and len(sp.id_to_piece(i)) > 1 for i in ids)


def test_decode_round_trips(loaded):
    _, tokenizer = loaded
    for s in probe_strings():
        assert tokenizer.decode(tokenizer(s, add_special_tokens=False)["input_ids"]) == s
    assert tokenizer("K:G")["input_ids"][0] == tokenizer.bos_token_id == 1  # InternLM2 adds <s>


def test_special_tokens_keep_their_ids(loaded, sp):
    _, tokenizer = loaded
    for token in ["<unk>", "<s>", "</s>", *INTERNLM2_SPECIAL_TOKENS]:
        assert tokenizer.convert_tokens_to_ids(token) == sp.piece_to_id(token)
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [sp.piece_to_id(token)]
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token_id == 2
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_chat_prompt_ids_equal_sentencepiece(loaded, sp):
    _, tokenizer = loaded
    chat = [{"role": "user", "content": "写一首  欢快的 reel in G, 6/8"},
            {"role": "assistant", "content": "X:1\nM:6/8\nK:G\n|:GAB  c2d|]"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    assert text.startswith("<s><|im_start|>system\n")
    # SentencePiece matches the user-defined chat tokens itself; <s> is a control symbol it never reads
    assert ids == [sp.bos_id()] + sp.encode(text.removeprefix("<s>"))
    assert ids.count(sp.piece_to_id("<|im_start|>")) == 3 and ids.count(sp.bos_id()) == 1


# ---------------------------------------------------------------- the model

def test_logits_equal_internlm2_equations(loaded, internlm2_checkpoint):
    model, tokenizer = loaded
    cfg = json.loads((internlm2_checkpoint / "config.json").read_text())
    ids = tokenizer("X:1\nK:D\n|:DFA d2f|", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    reference = internlm2_reference_logits(load_state(internlm2_checkpoint), cfg, ids)
    assert (logits - reference).abs().max().item() < 1e-4


def test_loaded_model_generates(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Compose a jig."}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4
    assert IM_END in tokenizer.convert_ids_to_tokens(model.generation_config.eos_token_id)


def test_bin_single_file_checkpoint_converts_too(internlm2_checkpoint, tmp_path):
    src = write_internlm2_checkpoint(tmp_path / "bin", internlm2_checkpoint / "tokenizer.model",
                                     hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=1, intermediate_size=64, seed=3,
                                     safetensors=False, rope_scaling={"type": "dynamic", "factor": 2.0})
    assert (src / "pytorch_model.bin").is_file()
    dst = ensure_llama_checkpoint(src, cache_dir=tmp_path / "cache")
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(dst).eval()
    cfg = json.loads((src / "config.json").read_text())
    ids = torch.tensor([[1, 5, 300, 1200, 7, 42, 9]])
    with torch.no_grad():
        diff = (model(ids).logits - internlm2_reference_logits(load_state(src), cfg, ids)).abs().max()
    assert diff.item() < 1e-4  # dynamic NTK equals plain rope below max_position_embeddings


# ---------------------------------------------------------------- the cache

def test_second_call_is_a_lookup(internlm2_checkpoint, internlm2_converted):
    before = {p.name: p.stat().st_mtime_ns for p in internlm2_converted.iterdir()}
    again = ensure_llama_checkpoint(internlm2_checkpoint, cache_dir=internlm2_converted.parent)
    assert again == internlm2_converted
    assert {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == before
    assert not list(internlm2_converted.parent.glob(".partial-*"))


def test_changed_source_converts_again(internlm2_checkpoint, tmp_path):
    src = tmp_path / "copy"
    shutil.copytree(internlm2_checkpoint, src)
    first = ensure_llama_checkpoint(src, cache_dir=tmp_path / "cache")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "rope_theta": 10000.0}))
    second = ensure_llama_checkpoint(src, cache_dir=tmp_path / "cache")
    assert second != first and json.loads((second / "config.json").read_text())[
        "rope_parameters"]["rope_theta"] == 10000.0


def test_interrupted_conversion_leaves_no_cache(internlm2_checkpoint, tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the conversion were stopped half way

    monkeypatch.setattr(internlm2, "save_fast_tokenizer", killed)
    with pytest.raises(KeyboardInterrupt):
        ensure_llama_checkpoint(internlm2_checkpoint, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(internlm2.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert internlm2.default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv(internlm2.CACHE_ENV)
    assert internlm2.default_cache_dir() == Path.home() / ".cache" / "imelodist" / "converted"


# ---------------------------------------------------------------- hub ids

def use_hub_cache(monkeypatch, hub: Path) -> None:
    """An offline hub whose cache is `hub` (huggingface_hub reads HF_HUB_CACHE once, at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))


def fake_hub_cache(hub: Path, repo_id: str, files: Path) -> None:
    """The HF cache layout snapshot_download(local_files_only=True) reads: refs/main -> snapshots/<sha>."""
    commit = "0" * 40
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files, repo / "snapshots" / commit)


def test_hub_id_resolves_from_the_local_cache(internlm2_checkpoint, tmp_path, monkeypatch):
    use_hub_cache(monkeypatch, tmp_path / "hub")
    fake_hub_cache(tmp_path / "hub", "imelodist-test/internlm2-tiny", internlm2_checkpoint)
    dst = ensure_llama_checkpoint("imelodist-test/internlm2-tiny", cache_dir=tmp_path / "cache")
    assert dst.name.startswith("imelodist-test--internlm2-tiny-") and (dst / "tokenizer.json").is_file()


def test_hub_id_offline_says_how_to_point_at_a_local_copy(tmp_path, monkeypatch):
    use_hub_cache(monkeypatch, tmp_path / "empty")
    with pytest.raises(OSError, match=r"internlm/internlm2-chat-7b.*--local-dir DIR\) and pass DIR"):
        ensure_llama_checkpoint("internlm/internlm2-chat-7b", cache_dir=tmp_path / "cache")
    with pytest.raises(OSError, match="--local-dir"):
        load_model("internlm/internlm2-chat-7b")


# ---------------------------------------------------------------- remote code

def test_remote_code_runs_only_when_asked(internlm2_checkpoint, internlm2_converted, cache_env, capsys):
    assert model_source(internlm2_checkpoint) == (str(internlm2_converted), False)
    load_model(internlm2_checkpoint)  # the default: converted copy, the raising files untouched
    assert "trust_remote_code" not in capsys.readouterr().out
    assert not [m for m in sys.modules if "transformers_modules" in m]
    with pytest.raises(Exception) as err:
        load_model(internlm2_checkpoint, trust_remote_code=True)
    assert "remote code executed" in repr(err.value) + repr(err.value.__cause__) + repr(err.value.__context__)
    printed = capsys.readouterr().out
    assert "modeling_internlm2.py" in printed and "tokenization_internlm2.py" in printed


def test_auto_map_in_a_llama_folder_is_not_run(internlm2_converted, tmp_path):
    folder = tmp_path / "llama_with_code"
    shutil.copytree(internlm2_converted, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text('raise RuntimeError("remote code executed")\n')
    model, _ = load_model(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
