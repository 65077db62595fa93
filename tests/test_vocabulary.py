"""Whole Chinese characters added to a byte-level BPE tokenizer and its model's embeddings."""
from __future__ import annotations

import copy

import torch

from imelodist_lib.vocabulary import grow_embeddings, han_characters, whole_characters

NAMES = "贝多芬 路德维希·凡·贝多芬 柴可夫斯基 《梁祝》小提琴协奏曲 冼星海"


def test_chosen_characters_become_single_tokens_and_everything_else_tokenizes_as_before(tiny):
    _, tokenizer = tiny
    chars = han_characters([NAMES, "abc 123"])
    assert chars == sorted(set(NAMES) - set(" ·《》")) and "贝" in chars
    grown, added = whole_characters(tokenizer, chars)
    assert set(added) <= set(chars) and len(added) >= len(chars) - 2  # a few may be whole already
    for ch in chars:
        assert len(grown.encode(ch, add_special_tokens=False)) == 1, ch
    assert len(grown.encode("贝多芬", add_special_tokens=False)) <= 3 < len(tokenizer.encode("贝多芬", add_special_tokens=False))
    assert min(added.values()) >= len(tokenizer) and len(grown) > len(tokenizer)
    for text in ["X:1\nT:Jig\nM:6/8\nL:1/8\nK:G\n|:GAB c2d|e2f g3:|\n", "Who wrote it? 99 %",
                 "<|im_start|>user\n请创作一首曲子<|im_end|>", NAMES]:
        ids = grown.encode(text, add_special_tokens=False)
        assert grown.decode(ids) == text
        if not set(text) & set(chars):  # ABC, English and special tokens: the same ids as before
            assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert grown.all_special_ids == tokenizer.all_special_ids
    assert grown.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    again, none = whole_characters(grown, chars)
    assert none == {} and len(again) == len(grown)


def test_grown_embeddings_start_as_the_mean_of_the_pieces_and_old_logits_stay(tiny):
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    grown, added = whole_characters(tokenizer, han_characters([NAMES]))
    prompt = torch.tensor([tokenizer.encode("X:1\nK:G\nGAB", add_special_tokens=False)])
    with torch.no_grad():
        before = model(prompt).logits[0, :, :len(tokenizer)]
    rows = grow_embeddings(model, tokenizer, grown)
    assert rows == len(grown) - len(tokenizer) and model.config.vocab_size == len(grown)
    weight = model.get_input_embeddings().weight
    ch = "贝"
    pieces = tokenizer.encode(ch, add_special_tokens=False)
    assert torch.allclose(weight[added[ch]], weight[pieces].mean(0))
    assert model.get_output_embeddings().weight.data_ptr() == weight.data_ptr()  # still tied
    with torch.no_grad():
        after = model(prompt).logits[0]
    assert after.shape[-1] == len(grown) and torch.allclose(after[:, :len(tokenizer)], before, atol=1e-5)
    assert grow_embeddings(model, tokenizer, tokenizer) == 0
    # the grown pair decodes through the lean path under the UTF-8 mask and a grammar
    from imelodist_lib.inference import Composer
    from imelodist_lib.instructions import ComposeRequest
    from imelodist_lib.profiles import get_profile

    composer = Composer(model=model, tokenizer=grown, backend="transformers", profile=get_profile("cpu"))
    assert composer.engine.lean is not None
    [answer] = composer.compose(ComposeRequest("emotion", emotion="欢快", meter="3/4", key="D", bars=4),
                                seed=1, constrained=True, max_new_tokens=400)
    assert answer.ok and answer.finish_reason == "stop", answer.text
    for seed in range(3):  # the random model writes Chinese pieces; the UTF-8 mask keeps them whole
        [text] = composer.compose(ComposeRequest("emotion", emotion="欢快"), seed=seed, max_new_tokens=30)
        cut = text.finish_reason == "length"  # a character the token limit cut short is not counted
        assert "\ufffd" not in (text.text.rstrip("\ufffd") if cut else text.text), text.text
