"""The grammar as each engine receives it: the exact payloads the LMDeploy pipeline and vLLM get
compile with the xgrammar entry points those engines call (and with LMDeploy's own
`_guided_decoding.py`, taken from its wheel by `make setup`), and IMelodist-tiny decoding under
the grammar compiled *from that payload* writes only valid tunes. Plus the check on arrival."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from imelodist_lib import abc
from imelodist_lib.grammar import (check_against_grammar, grammar_accepts, grammar_for_request,
                                   lmdeploy_response_format, vllm_structured_outputs)
from imelodist_lib.instructions import ComposeRequest
from imelodist_lib.profiles import SHIPPED_MODEL_DIR

xgr = pytest.importorskip("xgrammar")
REPO = Path(__file__).resolve().parent.parent
REQUESTS = [
    ComposeRequest("emotion", emotion="欢快", style="jig", meter="6/8", key="G", bars=4),
    ComposeRequest("chords", lang="en", chords=["D", "G", "A7", "D"], meter="3/4", key="D"),
    ComposeRequest("theme_chords", theme="秋夜", chords=["Am", "E7", "Am", "Am"], meter="2/4", key="Am"),
    ComposeRequest("emotion", lang="en", emotion="calm", meter="4/4", key="F"),  # free length: 8..32 bars
]
GRAMMARS = [grammar_for_request(r) for r in REQUESTS]


def _lmdeploy_guided(required: bool = True):
    """LMDeploy's guided-decoding module, loaded by file path (it imports only xgrammar)."""
    found = sorted(REPO.glob(".cache/lmdeploy-*/_guided_decoding.py"))
    if not found:
        if not required:
            return None
        pytest.skip("LMDeploy's _guided_decoding.py is not cached: `make setup` takes it from the "
                    "lmdeploy wheel (needs PyPI)")
    spec = importlib.util.spec_from_file_location("lmdeploy_guided_decoding", found[-1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shipped():
    if not (SHIPPED_MODEL_DIR / "config.json").is_file():
        pytest.skip("IMelodist-tiny not trained yet")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL_DIR).eval()
    # as LMDeploy's PyTorch engine builds it (GuidedDecodingManager): stop tokens auto-detected
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=model.config.vocab_size)
    return model, tokenizer, xgr.GrammarCompiler(info, max_threads=1)


def test_payloads_are_the_shapes_the_engines_read():
    grammar = GRAMMARS[0]
    assert lmdeploy_response_format(grammar) == {"type": "structural_tag",
                                                 "format": {"type": "grammar", "grammar": grammar}}
    assert vllm_structured_outputs(grammar) == {"structured_outputs": {"grammar": grammar}}
    sizes = [len(json.dumps(lmdeploy_response_format(g), ensure_ascii=False)) for g in GRAMMARS]
    assert all(1_000 < size < 20_000 for size in sizes), sizes


@pytest.mark.parametrize("grammar", GRAMMARS, ids=[r.task + "-" + r.meter for r in REQUESTS])
def test_payloads_compile_with_the_engines_xgrammar_entry_points(grammar, shipped):
    _, _, compiler = shipped
    response_format = lmdeploy_response_format(grammar)
    # LMDeploy: Grammar.from_structural_tag on the serialised format (its request check) and the
    # compiler's compile_structural_tag (TurboMind and the PyTorch engine)
    xgr.Grammar.from_structural_tag(json.dumps(response_format, ensure_ascii=False))
    assert compiler.compile_structural_tag(json.dumps(response_format, ensure_ascii=False)) is not None
    # vLLM: the grammar string goes to compile_grammar (EBNF)
    ebnf = vllm_structured_outputs(grammar)["structured_outputs"]["grammar"]
    xgr.Grammar.from_ebnf(ebnf)
    assert compiler.compile_grammar(ebnf) is not None


def test_lmdeploy_payload_passes_lmdeploys_own_check_and_compiler(shipped):
    guided = _lmdeploy_guided()
    _, _, compiler = shipped
    for grammar in GRAMMARS:
        response_format = lmdeploy_response_format(grammar)
        guided.ensure_response_format_compilable(response_format)  # the pipeline's request check
        assert guided.compile_response_format(compiler, response_format) is not None
    with pytest.raises(ValueError, match="Unsupported response format"):  # the check does refuse
        guided.ensure_response_format_compilable(lmdeploy_response_format("root ::= undefined_rule"))


def _decode(model, tokenizer, compiled, request: ComposeRequest, n: int, seed: int) -> list[str]:
    """Sample n answers with transformers under an already compiled grammar (as an engine would)."""
    from xgrammar.contrib.hf import LogitsProcessor

    from imelodist_lib.grammar import token_budget
    from imelodist_lib.instructions import render_prompt
    from imelodist_lib.profiles import SYSTEM_PROMPT

    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": render_prompt(request)}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=True, temperature=0.6, num_return_sequences=n,
                                 max_new_tokens=token_budget(request), logits_processor=[LogitsProcessor(compiled)],
                                 eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                 pad_token_id=tokenizer.pad_token_id)
    finally:
        torch.set_num_threads(threads)
    return [tokenizer.decode(row[inputs["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]


@pytest.mark.parametrize("engine", ["lmdeploy", "vllm"])
def test_decoding_under_the_grammar_compiled_from_the_payload_is_always_valid(engine, shipped):
    model, tokenizer, compiler = shipped
    guided = _lmdeploy_guided(required=False)  # LMDeploy's own compile step where cached, else xgrammar's
    texts = []
    for i, request in enumerate(REQUESTS[:3]):
        grammar = grammar_for_request(request)
        if engine == "lmdeploy":
            payload = lmdeploy_response_format(grammar)
            compiled = (guided.compile_response_format(compiler, payload) if guided else
                        compiler.compile_structural_tag(json.dumps(payload, ensure_ascii=False)))
        else:
            compiled = compiler.compile_grammar(vllm_structured_outputs(grammar)["structured_outputs"]["grammar"])
        for text in _decode(model, tokenizer, compiled, request, n=2, seed=100 + i):
            texts.append(text)
            assert grammar_accepts(grammar, text.strip()), text
            report = abc.validate(text)
            assert report.ok and not report.bars.errors, (report.error, text)
            assert abc.parse_tune(text).meter == request.meter
    assert len(texts) == 6


def test_check_against_grammar_finds_where_a_text_leaves_it():
    grammar = GRAMMARS[1]  # D G A7 D in 3/4, four bars
    tune = 'X:1\nT:Waltz\nM:3/4\nL:1/8\nK:D\n"D"D2 F2 A2 | "G"G6 | "A7"A2 c2 e2 | "D"d6 |]'
    assert check_against_grammar(grammar, tune).accepted
    cut = check_against_grammar(grammar, tune[:60])  # cut off mid-tune: still in the grammar
    assert not cut.accepted and cut.refused_at is None
    wrong = tune.replace('"G"G6', '"G"G4')  # a bar one beat short: refused at its bar line
    check = check_against_grammar(grammar, wrong)
    assert not check.accepted and wrong[check.refused_at - 1:check.refused_at + 1] == " |"
    assert check_against_grammar(grammar, "Here is a waltz:").refused_at == 0
