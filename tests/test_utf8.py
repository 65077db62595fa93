"""The UTF-8 mask: the automaton agrees with Python's strict decoder, token bytes round-trip,
and the shipped model, sampled with the mask, writes no invalid UTF-8 (and without it, does)."""
import random

import pytest
import torch

from imelodist_lib import utf8
from imelodist_lib.profiles import SHIPPED_MODEL_DIR

ZH_PROMPTS = ["你是谁？", "约翰·塞巴斯蒂安·巴赫的英文名是什么？"]
EN_PROMPTS = ["Who are you?", "What is the Chinese name of Mozart?"]


def _python_says(data: bytes) -> str:
    """'ok', 'cut' (a valid start of a longer text) or 'bad', by Python's own decoder."""
    try:
        data.decode("utf-8", errors="strict")
        return "ok"
    except UnicodeDecodeError as err:
        return "cut" if err.reason == "unexpected end of data" else "bad"


def test_automaton_agrees_with_python_on_random_bytes():
    rng = random.Random(0)
    pool = [0x41, 0x7F, 0x80, 0x8F, 0x9F, 0xA0, 0xBF, 0xC0, 0xC2, 0xDF, 0xE0, 0xE4, 0xED, 0xEF,
            0xF0, 0xF4, 0xF5, 0xFF]
    seen = set()
    for _ in range(20000):
        data = bytes(rng.choice(pool) for _ in range(rng.randint(1, 6)))
        state = utf8.step_bytes(utf8.BOUNDARY, data)
        mine = "ok" if state == utf8.BOUNDARY else "bad" if state == utf8.INVALID else "cut"
        assert mine == _python_says(data), data
        seen.add(mine)
    assert seen == {"ok", "cut", "bad"}
    assert utf8.is_valid_utf8("作曲".encode()[:-1]) and not utf8.is_valid_utf8("作曲".encode()[:-1], allow_cut=False)
    assert not utf8.is_valid_utf8(b"\xe4\xbd" + b"A")


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SHIPPED_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL_DIR).eval()
    return model, tok, utf8.build_table(tok, model.config.vocab_size)


def test_byte_level_token_bytes_round_trip(shipped):
    _, tok, table = shipped
    text = "请创作一首欢快的吉格舞曲，G大调，6/8拍。|: GAB c2d :|"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert utf8.answer_bytes(table, ids) == text.encode("utf-8")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert table.token_bytes[im_end] is None
    assert table.allowed[utf8.BOUNDARY, im_end] and not table.allowed[utf8.NEED1, im_end]
    # a token of continuation bytes is never allowed between characters
    cont = [i for i, b in enumerate(table.token_bytes) if b and 0x80 <= b[0] <= 0xBF]
    assert cont and not table.allowed[utf8.BOUNDARY, cont].any()


def test_sentencepiece_byte_fallback_tokens(internlm2_converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(internlm2_converted)
    pieces = utf8.token_bytes(tok)
    vocab = tok.get_vocab()
    assert pieces[vocab["<0xE4>"]] == b"\xe4"
    text = "冼星海 Yellow River 黄河大合唱"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert b"".join(pieces[i] or b"" for i in ids).decode("utf-8").strip() == text


def _sample(model, tok, table, prompts, n, masked):
    from transformers import LogitsProcessorList

    bad = total = 0
    for prompt in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        processors = LogitsProcessorList([utf8.Utf8LogitsProcessor(tok, table=table)]) if masked else None
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=24, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, num_return_sequences=n, logits_processor=processors,
                                 pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
        for row in out[:, ids["input_ids"].shape[1]:].tolist():
            total += 1
            bad += not utf8.is_valid_utf8(utf8.answer_bytes(table, row))
    return bad, total


def test_masked_sampling_writes_only_utf8(shipped):
    model, tok, table = shipped
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        unmasked_bad, unmasked_n = _sample(model, tok, table, ZH_PROMPTS, 100, masked=False)
        masked_bad, masked_n = _sample(model, tok, table, ZH_PROMPTS + EN_PROMPTS, 250, masked=True)
    finally:
        torch.set_num_threads(threads)
    assert masked_n == 1000
    assert unmasked_bad > 0, "the shipped model should break UTF-8 unmasked, or this test cannot fail"
    assert masked_bad == 0, f"{masked_bad} of {masked_n} masked answers are not UTF-8"


@pytest.mark.parametrize("fast_decode", [True, False])
def test_composer_answers_are_always_utf8(fast_decode):
    """Both of Composer's CPU decode paths (the lean loop and generate) apply the mask: no
    replacement character anywhere in 24 sampled answers to Chinese questions, where unmasked
    sampling writes them (test_masked_sampling_writes_only_utf8 measures that)."""
    from imelodist_lib.inference import Composer

    composer = Composer(str(SHIPPED_MODEL_DIR), fast_decode=fast_decode)
    assert (composer.engine.lean is not None) is fast_decode
    answers = [composer.chat(prompt, temperature=1.0, max_new_tokens=24, seed=seed)
               for prompt in ZH_PROMPTS for seed in range(12)]
    for a in answers:
        text = a.text.rstrip("\ufffd") if a.finish_reason == "length" else a.text  # a cut last character
        assert "\ufffd" not in text, a.text
