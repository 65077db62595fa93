"""models.py: tokenizer, chat template, IMelodist-tiny, loading errors, InternLM2 -> Llama.

The converter is checked against a forward pass written here from InternLM2's equations in
plain torch (RMSNorm, rotary, grouped-query attention with causal mask, SwiGLU), on a random
checkpoint laid out exactly as InternLM2 stores it (fused wqkv per kv group).
"""
from __future__ import annotations

import json
from pathlib import Path

import music21
import pytest
import torch
from jinja2 import Template
from safetensors.torch import save_file

from imelodist_lib import models
from imelodist_lib.internlm2 import random_internlm2_state
from imelodist_lib.models import (
    CHAT_TEMPLATE,
    IM_END,
    convert_internlm2_to_llama,
    count_parameters,
    load_model,
    new_tiny_model,
    save_model,
    train_tokenizer,
)
from imelodist_lib.profiles import SYSTEM_PROMPT
from internlm2_reference import internlm2_reference_logits

# InternLM2-chat-7b's own chat template (tokenizer_config.json of internlm/internlm2-chat-7b)
INTERNLM2_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] "
                      "+ '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                      "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHORDED = ['X:1\nT:Chords\nM:4/4\nL:1/8\nK:G\n"G"G2B d2B|"C"c2e "D"d2A|"Em"B2G "C"E2C|"D"D4 "G"G4|]',
           'X:2\nT:Waltz\nM:3/4\nL:1/8\nK:C\n"C"c2 e2 g2|"F"f2 a2 c2|"G"B2 d2 g2|"C"c6|]']
PROSE = ["这是一首欢快的中国民歌，使用五声音阶。", "Compose a jig in G major with the chords G C D G.",
         "巴赫 (Johann Sebastian Bach) 写了《平均律钢琴曲集》。"]


def corpus_tunes(n: int) -> list[str]:
    folder = Path(music21.__file__).parent / "corpus" / "oneills1850"
    tunes: list[str] = []
    for path in sorted(folder.glob("*.abc")):
        tunes += ["X:" + t.strip() for t in path.read_text(encoding="latin-1").split("\nX:")[1:]]
        if len(tunes) >= n:
            break
    return tunes[:n]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus_tunes(300) + PROSE * 5 + CHORDED * 5


@pytest.fixture(scope="module")
def tokenizer(texts):
    return train_tokenizer(texts, vocab_size=1024)


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_round_trips_everything_without_unk(tokenizer, texts):
    unseen = "音乐 ♯♭ ü 𝄞 K:Bbmix\n[CEG]2 ^^f' _B,, z3/2 |]"  # characters never seen in training
    for text in [*texts[:20], *PROSE, unseen]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id is None


def test_special_tokens_are_single_ids(tokenizer):
    for token in models.SPECIAL_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == "<pad>"


def test_music_aware_tokens_never_span_two_notes(tokenizer):
    body = "|:G2B d2B|c2A F2A|GAB cde|f2d d3:|\n\"G\"B2d \"C\"e2g|(3ABc ^c2 d'2|]"
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(body, add_special_tokens=False)["input_ids"])
    notes = [p for p in pieces if any(ch in "ABCDEFGabcdefg" for ch in p) and '"' not in p]
    for piece in notes:
        letters = [ch for ch in piece if ch in "ABCDEFGabcdefg"]
        assert len(letters) == 1, f"token {piece!r} holds more than one note"
    assert '"G"' in pieces and '"C"' in pieces  # a chord symbol stays whole
    assert "(3" in pieces  # a tuplet marker stays whole


def test_music_aware_pretokenisation_is_a_real_choice(texts):
    # the plain GPT-2 rule splits digits off notes ("G2" -> "G", "2"); ours never does
    plain = train_tokenizer(texts, vocab_size=1024, music_aware=False)
    pieces = plain.convert_ids_to_tokens(plain("G2B d2B", add_special_tokens=False)["input_ids"])
    assert "G2" not in pieces
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(texts, vocab_size=100)
    with pytest.raises(ValueError, match="no texts"):
        train_tokenizer([], vocab_size=1024)


# ---------------------------------------------------------------- chat template

def test_chat_template_matches_internlm2(tokenizer):
    chat = [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "写一首欢快的曲子"},
            {"role": "assistant", "content": "X:1\nK:G\nGAB|]"}]
    ours = tokenizer.apply_chat_template(chat, tokenize=False)
    theirs = Template(INTERNLM2_TEMPLATE).render(messages=chat, bos_token="<s>",
                                                add_generation_prompt=False)
    assert ours == theirs
    prompt = tokenizer.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == Template(INTERNLM2_TEMPLATE).render(messages=chat[:2], bos_token="<s>",
                                                        add_generation_prompt=True)
    # without a system turn, the IMelodist system prompt is added
    assert tokenizer.apply_chat_template(chat[1:2], tokenize=False, add_generation_prompt=True) == \
        Template(INTERNLM2_TEMPLATE).render(messages=chat[:2], bos_token="<s>", add_generation_prompt=True)


def test_chat_template_string_does_not_depend_on_the_vocabulary(tokenizer, texts):
    other = train_tokenizer(texts[:50], vocab_size=600, music_aware=False)
    chat = [{"role": "user", "content": "Compose a reel."}]
    assert other.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_assistant_mask_covers_answer_and_im_end(tokenizer):
    chat = [{"role": "user", "content": "写一首曲子"}, {"role": "assistant", "content": "X:1\nK:D\nDFA|]"}]
    out = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    kept = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(kept) == "X:1\nK:D\nDFA|]" + IM_END


# ---------------------------------------------------------------- IMelodist-tiny

def test_tiny_model_default_size_and_saved_weights(tokenizer, tmp_path):
    model = new_tiny_model(train_tokenizer(corpus_tunes(300), vocab_size=2048))
    assert 5_000_000 <= count_parameters(model) <= 6_000_000
    assert model.config.tie_word_embeddings and model.config.max_position_embeddings >= 1024
    small = new_tiny_model(tokenizer, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128)
    save_model(small, tokenizer, tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_size < 25e6
    loaded, tok = load_model(tmp_path)
    assert tok.chat_template == CHAT_TEMPLATE
    ids = tok("X:1\nK:G\nGAB", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, small.eval()(ids).logits, atol=1e-5)
    # the full-size model in float32 stays under the 25 MB budget
    assert count_parameters(model) * 4 < 25e6


# ---------------------------------------------------------------- load errors

def test_load_model_missing_directory_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "no_such_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_load_model_offline_hub_id_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to fall back on
    with pytest.raises(OSError, match="cannot download imelodist-test/no-such-model here.*--local-dir"):
        load_model("imelodist-test/no-such-model")


# ---------------------------------------------------------------- InternLM2 -> Llama

CFG = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": 97,
       "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 8,
       "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
       "rope_theta": 1000000.0, "rope_scaling": None, "bias": False, "tie_word_embeddings": False,
       "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
       "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"}, "torch_dtype": "float32"}


@pytest.fixture()
def internlm2_dir(tmp_path) -> Path:
    src = tmp_path / "internlm2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(CFG))
    state = random_internlm2_state(CFG)
    # two shards with an index, as the 7B checkpoints come
    keys = sorted(state)
    first = {k: state[k] for k in keys[: len(keys) // 2]}
    second = {k: state[k] for k in keys[len(keys) // 2:]}
    save_file(first, str(src / "model-00001-of-00002.safetensors"))
    save_file(second, str(src / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {**{k: "model-00001-of-00002.safetensors" for k in first},
                            **{k: "model-00002-of-00002.safetensors" for k in second}}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    torch.save(state, src / "reference_state.pt")
    return src


def test_converted_checkpoint_matches_internlm2_equations(internlm2_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    dst = convert_internlm2_to_llama(internlm2_dir, tmp_path / "llama")
    state = torch.load(internlm2_dir / "reference_state.pt")
    ids = torch.randint(0, CFG["vocab_size"], (1, 23), generator=torch.Generator().manual_seed(1))
    reference = internlm2_reference_logits(state, CFG, ids)

    # the converted weights in plain torch, with separate q/k/v (Llama's layout)
    converted = {}
    for shard in sorted(dst.glob("*.safetensors")):
        converted.update(load_file(str(shard)))
    assert "model.layers.0.self_attn.q_proj.weight" in converted
    assert not any("wqkv" in k or "feed_forward" in k for k in converted)

    model = LlamaForCausalLM.from_pretrained(dst, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(ids).logits
    assert (logits - reference).abs().max().item() < 1e-4
    assert model.config.rope_parameters["rope_theta"] == CFG["rope_theta"]
    assert model.config.num_key_value_heads == 2 and not model.config.tie_word_embeddings
    assert (dst / "tokenizer_config.json").is_file() and (dst / "model.safetensors.index.json").is_file()


def test_wqkv_split_is_grouped_not_blocked():
    # a fused weight whose rows name their own (group, slot, dim): the split must follow the groups
    heads, kv, d, hidden = 4, 2, 3, 1
    rows = [[g * 100 + slot * 10 + j] for g in range(kv) for slot in range(heads // kv + 2) for j in range(d)]
    q, k, v = models.split_wqkv(torch.tensor(rows, dtype=torch.float32), heads, kv, d)
    assert q[:, 0].tolist() == [0, 1, 2, 10, 11, 12, 100, 101, 102, 110, 111, 112]
    assert k[:, 0].tolist() == [20, 21, 22, 120, 121, 122]
    assert v[:, 0].tolist() == [30, 31, 32, 130, 131, 132]


def test_rope_scaling_and_bad_inputs_are_mapped(tmp_path):
    cfg = {**CFG, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    llama = models.llama_config_from_internlm2(cfg)
    assert llama.rope_parameters["rope_type"] == "dynamic" and llama.rope_parameters["factor"] == 2.0
    with pytest.raises(ValueError, match="biases"):
        models.llama_config_from_internlm2({**CFG, "bias": True})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert_internlm2_to_llama(tmp_path / "nothing", tmp_path / "out")
