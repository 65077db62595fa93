"""The per-request ABC grammar: what it accepts, what it refuses, and what a model decodes under it.

The decoding tests use a freshly initialised tiny Llama: its unconstrained output is noise, so
every valid tune it writes under the grammar is the grammar's doing.
"""
from __future__ import annotations

import re
from fractions import Fraction

import pytest
import torch

from imelodist_lib import abc
from imelodist_lib.grammar import (abc_grammar, compile_grammar, grammar_accepts, grammar_for_request,
                                   token_budget,
                                   grammar_logits_processor, plan_bars)
from imelodist_lib.instructions import ComposeRequest

HEADER = "X:1\nT:Test\nM:{m}\nL:1/8\nK:G\n"


def _generate(model, tokenizer, grammar: str, n: int, seed: int, max_new_tokens: int = 900) -> list[str]:
    messages = [{"role": "user", "content": "请创作一首曲子"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")
    processor = grammar_logits_processor(tokenizer, grammar, vocab_size=model.config.vocab_size)
    torch.manual_seed(seed)
    out = model.generate(**inputs, do_sample=True, num_return_sequences=n, max_new_tokens=max_new_tokens,
                         logits_processor=[processor], pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return [tokenizer.decode(row[inputs["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]


@pytest.mark.parametrize("meter,unit,steps", [("4/4", "1/8", 16), ("6/8", "1/8", 12), ("3/4", "1/8", 12),
                                              ("C|", "1/8", 16), ("9/8", "1/8", 18), ("3/4", "1/4", 12),
                                              ("2/4", "1/16", 16)])
def test_bar_plan_counts_steps(meter, unit, steps):
    assert plan_bars(meter, unit).bar_steps == steps


def test_accepts_full_bars_and_refuses_short_or_long_ones():
    g = abc_grammar("4/4", "1/8", "G", title="Test", min_bars=2, max_bars=4)
    head = HEADER.format(m="4/4")
    assert grammar_accepts(g, head + "GABc d2e2 | f8 |]")
    assert grammar_accepts(g, head + "G>A (3Bcd e4 | [GBd]2 z2 c/d/e3 |]\n")
    assert grammar_accepts(g, head + "|: GABc d2e2 | f8 :|")
    assert not grammar_accepts(g, head + "GABc d2e2 | f7 |]")  # second bar one eighth short
    assert not grammar_accepts(g, head + "GABc d2e2 | f9 |]")  # too long
    assert not grammar_accepts(g, head + "GABc d2e2 |]")  # fewer than min_bars
    assert not grammar_accepts(g, head + "f8 | f8 | f8 | f8 | f8 |]")  # more than max_bars
    assert not grammar_accepts(g, head.replace("K:G", "K:D") + "GABc d2e2 | f8 |]")  # header is fixed


def test_repeats_and_endings_pair_up():
    g = abc_grammar("6/8", "1/8", "D", title="Test", min_bars=3, max_bars=8)
    head = HEADER.format(m="6/8").replace("K:G", "K:D")
    assert grammar_accepts(g, head + "|: d3 cBA | [1 B6 :| [2 A6 |]")
    assert grammar_accepts(g, head + "d3 cBA |: B6 | A6 :|")
    assert not grammar_accepts(g, head + "d3 cBA | B6 :| [2 A6 |]")  # second ending without a first
    assert not grammar_accepts(g, head + "|: d3 cBA | [1 B3 :| [2 A6 |]")  # short first ending


def test_forced_chord_progression_one_per_bar():
    g = abc_grammar("3/4", "1/8", "C", chord_symbols=["C", "F", "G7", "C"])
    head = "X:1\nT:Any title\nM:3/4\nL:1/8\nK:C\n"
    assert grammar_accepts(g, head + '"C"c6 | "F"A6 | "G7"B6 | "C"c6 |]')
    assert not grammar_accepts(g, head + '"C"c6 | "G"A6 | "G7"B6 | "C"c6 |]')
    assert not grammar_accepts(g, head + '"C"c6 | "F"A6 | "G7"B6 |]')


def test_grammar_stays_small_and_compiles(tiny):
    _, tokenizer = tiny
    g = abc_grammar("4/4", "1/8", "G", max_bars=32)
    rules = g.count(" ::= ")
    assert rules < 120, rules  # ~16 bar-fill rules + 2 per bar + a dozen element rules
    assert compile_grammar(tokenizer, g) is not None


@pytest.mark.parametrize("meter,key,bars", [("6/8", "G", 6), ("3/4", "Am", 5), ("4/4", "Edor", 5)])
def test_random_model_under_grammar_writes_valid_tunes(tiny, meter, key, bars):
    model, tokenizer = tiny
    g = abc_grammar(meter, "1/8", key, min_bars=4, max_bars=bars)
    for text in _generate(model, tokenizer, g, n=2, seed=bars):
        assert grammar_accepts(g, text), text
        report = abc.validate(text)
        assert report.ok, (report.error, text)
        assert report.bars.errors == [], text
        assert 4 <= report.bars.checked <= bars, text


def test_chords_request_grammar_puts_each_chord_on_its_bar(tiny):
    model, tokenizer = tiny
    request = ComposeRequest("chords", chords=["G", "C", "D7", "G"], meter="4/4", key="G")
    g = grammar_for_request(request)
    [text] = _generate(model, tokenizer, g, n=1, seed=3)
    body = text.split("K:G\n", 1)[1]
    assert re.findall(r'"([^"]+)"', body) == ["G", "C", "D7", "G"]
    assert abc.validate(text).bars.errors == []


def test_continuation_grammar_keeps_the_seed_bars(tiny):
    model, tokenizer = tiny
    seed = "X:1\nT:Seed\nM:4/4\nL:1/8\nK:D\nDEFG ABcd | e2d2 c2B2 |"
    g = grammar_for_request(ComposeRequest("continue", seed_abc=seed, bars=6))
    [text] = _generate(model, tokenizer, g, n=1, seed=5)
    assert text.startswith(seed)
    assert abc.validate(text).bars.errors == []


def test_a_continuation_counts_essen_line_end_bars(tiny):
    # the seed's first line is one full bar with no bar line (Essen style): abc reads two bars,
    # so a 5-bar continuation writes three new ones (splitting on bar lines alone counted one)
    model, tokenizer = tiny
    seed = "X:1\nT:Seed\nM:2/4\nL:1/8\nK:G\nGABc\ndedB |"
    g = grammar_for_request(ComposeRequest("continue", seed_abc=seed, bars=5))
    for text in _generate(model, tokenizer, g, n=2, seed=3, max_new_tokens=300):
        assert text.startswith(seed)
        report = abc.validate(text).bars
        assert report.errors == [] and len(report.bars) == 5


@pytest.mark.parametrize("kwargs,message", [
    (dict(meter="4/4", unit_length="1/8", key="G", min_bars=5, max_bars=3), "min_bars"),
    (dict(meter="5/32", unit_length="1/8", key="G"), "whole number"),
    (dict(meter="4/4", unit_length="1/8", key="G", prefix_abc="GABc d"), "bar line"),
    (dict(meter="4/4", unit_length="1/8", key="G", chord_symbols=[]), "chord"),
])
def test_bad_requests_fail_with_the_cause(kwargs, message):
    with pytest.raises(ValueError, match=message):
        abc_grammar(**kwargs)


def test_describe_has_no_grammar():
    with pytest.raises(ValueError, match="prose"):
        grammar_for_request(ComposeRequest("describe", seed_abc="X:1\nK:C\nCDEF|"))


def test_unit_length_as_fraction():
    assert abc_grammar("2/4", Fraction(1, 16), "C", max_bars=2, min_bars=1).count("L:1/16") == 1


def test_token_budget_covers_the_longest_tune_the_grammar_allows():
    # 40 chords of 4/2 at L:1/8: a budget fixed at 1024 tokens cut such answers off (invalid)
    long = ComposeRequest("chords", lang="en", chords=["G", "Am"] * 20, meter="4/2", key="G")
    short = ComposeRequest("chords", lang="en", chords=["G", "C", "D", "G"], meter="3/4", key="G")
    steps = plan_bars("4/2", "1/8").bar_steps
    assert token_budget(long) >= 40 * 2 * steps
    assert token_budget(short) < token_budget(long)
