"""The lean decode path against transformers on a tiny real Llama: the same logits, the same greedy
and seeded tokens as `generate`, rows independent of the batch they share, grammar rows valid."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from imelodist_lib import abc
from imelodist_lib.fast_decode import (MIN_REUSED, LeanLlama, Row, Sampling, _Noise, blas_threads, decode,
                                      iter_decode, sample_row, supports)
from imelodist_lib.grammar import stop_token_ids
from imelodist_lib.inference import Composer
from imelodist_lib.instructions import ComposeRequest
from imelodist_lib.profiles import get_profile

CPU = get_profile("cpu", max_new_tokens=120)
TEXTS = ["X:1\nT:Jig\nM:6/8\nL:1/8\nK:G\n", "M:3/4\nK:D\nA2 B2 c2 |", "X:2\nK:Am\n", "你是专业的音乐作曲家 请创作一首曲子"]
HOT = Sampling(temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=24)


@pytest.fixture(scope="module")
def lean(tiny):
    return LeanLlama(tiny[0])


@pytest.fixture(scope="module")
def prompts(tiny):
    return [tiny[1].encode(text) for text in TEXTS]


def _generate(model, prompt, sampling: Sampling, stops, seed: int = 0) -> list[int]:
    """transformers' answer (new tokens, through the first stop token) for one prompt."""
    torch.manual_seed(seed)
    options = dict(do_sample=False)
    if sampling.temperature > 0:
        options = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=sampling.max_new_tokens, eos_token_id=stops,
                             pad_token_id=stops[0], **options)[0, len(prompt):].tolist()
    stop = next((i for i, t in enumerate(out) if t in stops), None)
    return out if stop is None else out[:stop + 1]


def test_logits_equal_the_transformers_forward(tiny, lean, prompts):
    model, _ = tiny
    for prompt in prompts:
        with torch.no_grad():
            reference = model(torch.tensor([prompt])).logits[0]
        cache = lean.new_cache(1, len(prompt))
        assert torch.allclose(torch.from_numpy(lean.prefill(prompt, cache, 0, all_logits=True)), reference, atol=1e-4)
        # the one-token step, position by position after a short prefill, gives the same logits
        cache = lean.new_cache(1, len(prompt))
        lean.prefill(prompt[:2], cache, 0)
        for i in range(2, len(prompt)):
            step = torch.from_numpy(lean.step([prompt[i]], [i], cache)[0])
            assert torch.allclose(step, reference[i], atol=1e-4), i


def test_greedy_and_seeded_sampling_give_generates_tokens(tiny, lean, prompts):
    model, tokenizer = tiny
    stops = stop_token_ids(tokenizer)
    greedy = Sampling(0.0, 1.0, 0, 24)
    for i, prompt in enumerate(prompts):
        [row] = decode(lean, [Row(prompt)], greedy, stops)
        assert row.tokens == _generate(model, prompt, greedy, stops)
        [row] = decode(lean, [Row(prompt, seed=i)], HOT, stops)
        assert row.tokens == _generate(model, prompt, HOT, stops, seed=i)


def test_rows_do_not_depend_on_their_batch(lean, prompts, tiny):
    stops = stop_token_ids(tiny[1])
    rows = [Row(p, seed=s) for s in (1, 2) for p in prompts]  # 8 rows, 4 prompt lengths
    alone = [decode(lean, [row], HOT, stops)[0].tokens for row in rows]
    assert len({tuple(t) for t in alone}) > 4  # seeds and prompts matter
    for batch_size in (8, 3):  # all at once; 3 slots refilled as rows finish, then compacted
        together = decode(lean, rows, HOT, stops, batch_size=batch_size)
        assert [r.tokens for r in together] == alone
        assert all(r.finish_reason == "length" and len(r.tokens) == HOT.max_new_tokens for r in together)
    # the same seed twice gives the same answer; a row's own limit cuts it there
    twice = decode(lean, [Row(prompts[0], seed=7), Row(prompts[0], seed=7, max_new_tokens=5)], HOT, stops)
    assert twice[1].tokens == twice[0].tokens[:5]


def test_a_stop_token_ends_only_its_row(lean, prompts):
    greedy = Sampling(0.0, 1.0, 0, 16)
    free = decode(lean, [Row(p) for p in prompts], greedy, [0])
    stop = free[1].tokens[5]  # make a token row 1 writes at step 6 the stop token
    stopped = decode(lean, [Row(p) for p in prompts], greedy, [stop])
    for before, after in zip(free, stopped):
        cut = next((i for i, t in enumerate(before.tokens) if t == stop), None)
        if cut is None:
            assert after.tokens == before.tokens and after.finish_reason == "length"
        else:
            assert after.tokens == before.tokens[:cut + 1] and after.finish_reason == "stop"
    assert stopped[1].finish_reason == "stop" and len(stopped[1].tokens) <= 6
    streamed = [token for _, token in iter_decode(lean, [Row(prompts[1])], greedy, [stop])]
    assert streamed == stopped[1].tokens


def test_guaranteed_valid_batch_of_different_requests(tiny):
    model, tokenizer = tiny
    composer = Composer(model=model, tokenizer=tokenizer, backend="transformers", profile=CPU)
    assert composer.engine.lean is not None
    requests = [ComposeRequest("emotion", emotion="欢快", meter="6/8", key="G", bars=4),
                ComposeRequest("chords", lang="en", chords=["G", "C", "D", "G"], meter="3/4", key="G"),
                ComposeRequest("continue", seed_abc="X:1\nT:Seed\nM:4/4\nL:1/8\nK:D\nDEFG ABcd |", bars=3)]
    batched = composer.compose_many(requests, n=2, seed=11, constrained=True, max_new_tokens=1200)
    for i, (request, answers) in enumerate(zip(requests, batched)):
        assert len(answers) == 2 and answers[0].text != answers[1].text
        for c in answers:
            assert c.constrained and c.finish_reason == "stop" and c.ok, c.text
            report = abc.validate(c.abc)
            assert report.ok and not report.bars.errors
            assert abc.parse_tune(c.abc).meter == (request.meter or "4/4")
        alone = composer.compose(request, n=2, seed=11 + i, constrained=True, max_new_tokens=1200)
        assert [c.text for c in alone] == [c.text for c in answers]


def test_guaranteed_valid_on_one_core_fills_every_mask_without_the_worker(tiny, monkeypatch):
    """One core: no worker thread, so each step's grammar mask is filled on the main thread after
    the step; the answers are the same as with the worker (before this was mended, masks after
    the first token were never filled there and the decode ran free)."""
    import os

    model, tokenizer = tiny
    composer = Composer(model=model, tokenizer=tokenizer, backend="transformers", profile=CPU)
    requests = [ComposeRequest("emotion", emotion="欢快", meter="6/8", key="G", bars=4),
                ComposeRequest("chords", lang="en", chords=["G", "C", "D", "G"], meter="3/4", key="G")]
    with_worker = [composer.compose(r, seed=5, constrained=True, max_new_tokens=600)[0] for r in requests]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    one_core = [composer.compose(r, seed=5, constrained=True, max_new_tokens=600)[0] for r in requests]
    batched = composer.compose_many(requests, seed=5, constrained=True, max_new_tokens=600)
    for a, b, [c] in zip(with_worker, one_core, batched):
        assert b.text == a.text and b.finish_reason == "stop" and b.ok, b.text
        assert c.ok and c.finish_reason == "stop" and not abc.validate(c.abc).bars.errors, c.text


def test_composer_lean_path_matches_generate_and_opts_out(tiny):
    model, tokenizer = tiny
    fast = Composer(model=model, tokenizer=tokenizer, backend="transformers", profile=CPU)
    slow = Composer(model=model, tokenizer=tokenizer, backend="transformers", profile=CPU, fast_decode=False)
    assert slow.engine.lean is None
    request = ComposeRequest("emotion", lang="en", emotion="calm", meter="3/4", key="D")
    for constrained in (False, True):
        a = fast.compose(request, seed=3, constrained=constrained, max_new_tokens=60)[0]
        b = slow.compose(request, seed=3, constrained=constrained, max_new_tokens=60)[0]
        assert (a.text, a.completion_tokens, a.finish_reason) == (b.text, b.completion_tokens, b.finish_reason)
    streamed = "".join(fast.stream(request, seed=3, constrained=True, max_new_tokens=60))
    assert streamed == fast.compose(request, seed=3, constrained=True, max_new_tokens=60)[0].text


def test_weights_changed_in_place_are_read_again(tiny, prompts):
    model = copy.deepcopy(tiny[0])
    lean = LeanLlama(model)
    assert not lean.stale()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2)
    assert lean.stale()
    fresh = LeanLlama(model)
    with torch.no_grad():
        reference = model(torch.tensor([prompts[0]])).logits[0, -1]
    assert torch.allclose(torch.from_numpy(fresh.prefill(prompts[0], fresh.new_cache(1, 64), 0)), reference, atol=1e-4)


def test_models_it_cannot_run_say_so(tiny):
    model = copy.deepcopy(tiny[0]).to(torch.float64)
    assert "float32" in supports(model)
    with pytest.raises(ValueError, match="use model.generate"):
        LeanLlama(model)
    assert Composer(model=model, tokenizer=tiny[1], backend="transformers", profile=CPU).engine.lean is None


def test_evaluation_collects_batched_answers_equal_to_one_at_a_time(tiny, tmp_path):
    from imelodist_lib import evaluation as ev
    from imelodist_lib import jsonl

    model, tokenizer = tiny
    composer = Composer(model=model, tokenizer=tokenizer, backend="transformers", profile=CPU)
    requests = [ComposeRequest("emotion", emotion="欢快", meter="6/8", key="G", bars=4),
                ComposeRequest("chords", lang="en", chords=["G", "C", "D", "G"], meter="3/4", key="G"),
                ComposeRequest("emotion", lang="en", emotion="calm", meter="3/4", key="D", bars=4)]
    path = tmp_path / "answers.jsonl"
    pairs = ev.collect_answers(composer, requests, n=2, seed=5, results_path=path, batch_requests=2,
                               max_new_tokens=20)
    alone = [(r, c.abc or c.text) for i, r in enumerate(requests)
             for c in composer.compose(r, n=2, seed=5 + i, max_new_tokens=20)]
    assert pairs == alone and len(jsonl.read_jsonl(path)) == 6


def test_batched_step_and_a_few_tokens_logits_equal_the_one_row_step(lean, prompts):
    """The forward paths agree: one row, many rows at their own positions (the same arithmetic
    per row: equal, not just close), a many-token prefill, and the LM head read for a few tokens
    only (what a guaranteed-valid single row uses)."""
    rows = prompts[:3]
    cache = lean.new_cache(len(rows), 128)
    singles = [lean.new_cache(1, 128) for _ in rows]
    for i, prompt in enumerate(rows):
        lean.prefill(prompt, cache, i)
        lean.prefill(prompt, singles[i], 0)
    positions = np.array([len(p) for p in rows])
    assert len(set(positions.tolist())) > 1  # rows at different positions
    batched = lean.step(np.array([5, 6, 7]), positions, cache)
    for i, position in enumerate(positions):
        one = lean.step([5 + i], [position], singles[i])[0]
        assert np.array_equal(batched[i], one)
        assert np.array_equal(cache[:, i, :position + 1], singles[i][:, 0, :position + 1])
        following = lean.prefill(list(rows[i]) + [5 + i], lean.new_cache(1, 128), 0)
        assert np.allclose(one, following, atol=1e-4)  # the step == the prefill's next position
        unit = lean._step_one(5 + i, int(position) + 1, singles[i], head=False)
        ids = np.array([0, 3, 17, lean.vocab_size - 1])
        assert np.allclose(lean.logits(unit, ids), lean.logits(unit)[ids], atol=1e-5)
    shared = lean.new_cache(2, 128)
    for i in range(2):
        lean.prefill(rows[0], shared, i)
    n = len(rows[0])
    both = lean.step([5, 9], [n, n], shared)
    assert np.array_equal(both[0], batched[0]) and not np.allclose(both[1], both[0])


@pytest.mark.parametrize("sampling", [Sampling(0.6, 0.95, 50, 1), Sampling(1.0, 0.9, 0, 1),
                                      Sampling(0.8, 1.0, 20, 1), Sampling(1.3, 0.5, 5, 1)])
def test_sampling_picks_the_token_transformers_picks_from_the_same_noise(sampling):
    """sample_row == transformers' temperature, top-k, top-p warpers, softmax and multinomial's
    argmax(probs / Exp(1) noise), on the same noise: the same distribution, token for token.
    Half the trials mask most tokens (fewer allowed than top-k), as a grammar does."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                         TopPLogitsWarper)

    warpers = [TemperatureLogitsWarper(sampling.temperature)]
    warpers += [TopKLogitsWarper(sampling.top_k)] if sampling.top_k else []
    warpers += [TopPLogitsWarper(sampling.top_p)] if sampling.top_p < 1 else []
    rng = np.random.default_rng(0)
    for trial in range(200):
        scores = (rng.standard_normal(512) * 3).astype(np.float32)
        if trial % 2:
            scores[rng.random(512) < 0.97] = -np.inf
            scores[rng.integers(512)] = 1.0  # at least one allowed
        noise = rng.exponential(size=512).astype(np.float32)
        reference = torch.from_numpy(scores.copy())[None]
        for warp in warpers:
            reference = warp(None, reference)
        expected = int((reference.softmax(-1) / torch.from_numpy(noise)).argmax())
        assert sample_row(scores, sampling, noise) == expected, trial
        if trial % 2:  # a grammar's row: only the allowed tokens' logits, the same token
            ids = np.flatnonzero(scores > -np.inf)
            assert sample_row(scores[ids].copy(), sampling, noise, ids) == expected, trial


def test_blas_threads_are_limited_inside_and_restored_after():
    from threadpoolctl import threadpool_info

    def blas() -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas()
    with blas_threads(1):
        assert blas() and set(blas()) == {1}
    assert blas() == before


def test_prefill_from_a_start_position_is_the_cached_multi_position_step(lean, prompts):
    """prefill(..., start=p) runs positions p.. against the cache's first p positions: a prompt in
    two pieces gives the whole prompt's logits, and rewriting positions after p (what a rejected
    speculative draft leaves behind) gives what a cache that never saw them gives."""
    prompt = prompts[0]
    whole = lean.prefill(prompt, lean.new_cache(1, 64), 0, all_logits=True)
    for cut in (1, 5, len(prompt) - 1):
        cache = lean.new_cache(1, 64)
        head = lean.prefill(prompt[:cut], cache, 0, all_logits=True)
        tail = lean.prefill(prompt[cut:], cache, 0, all_logits=True, start=cut)
        assert np.allclose(np.concatenate([head, tail]), whole, atol=1e-4), cut
        unit = lean.prefill(prompt[cut:], cache, 0, all_logits=True, start=cut, head=False)
        assert np.allclose(lean.logits(unit[-1]), whole[-1], atol=1e-4)
    n = len(prompt)
    cache = lean.new_cache(1, 64)
    lean.prefill(prompt, cache, 0)
    lean.prefill([7, 8, 9], cache, 0, start=n)  # a draft of three written at n..n+2, then dropped
    rewritten = lean.prefill([7, 11], cache, 0, all_logits=True, start=n)
    fresh = lean.new_cache(1, 64)
    lean.prefill(prompt, fresh, 0)
    assert np.allclose(rewritten, lean.prefill([7, 11], fresh, 0, all_logits=True, start=n), atol=1e-5)
    step = lean._step_one(11, n + 1, fresh)  # the one-row step agrees with the second position
    assert np.allclose(rewritten[1], step, atol=1e-4) and not np.allclose(rewritten[0], rewritten[1])


def test_a_prompt_sharing_the_last_ones_start_reuses_its_keys_and_values(tiny, prompts):
    """prefill_row: a prompt that starts like the last one prefilled gives the logits and cache a
    fresh prefill gives (shared start copied, the rest run from there), whatever it shares."""
    lean = LeanLlama(tiny[0])  # its own: prefill_row remembers the last prompt
    first = prompts[3]  # the Chinese system-prompt text: many byte tokens
    assert len(first) > MIN_REUSED + 3
    others = [first[:MIN_REUSED + 2] + prompts[0],  # shares its first tokens only
              list(first),  # the same prompt again: the last position still runs
              first[:MIN_REUSED - 1] + prompts[1],  # shares too little to reuse
              prompts[2]]  # shares nothing
    lean.prefill_row(first, lean.new_cache(1, 96), 0)
    for prompt in others:
        fresh = lean.new_cache(1, 96)
        expected = lean.prefill(prompt, fresh, 0)
        cache = lean.new_cache(2, 96)
        got = lean.prefill_row(prompt, cache, 1)
        assert np.allclose(got, expected, atol=1e-5)
        assert np.allclose(cache[:, 1, :len(prompt)], fresh[:, 0, :len(prompt)], atol=1e-5)
        assert not cache[:, 0].any()  # other rows untouched
    reused = lean._last_prompt[1]
    assert reused.shape[:2] == (len(lean.layers), len(prompts[2]))


def test_noise_drawn_ahead_in_a_worker_is_the_one_token_at_a_time_sequence():
    """_Noise gives, token after token, what one exponential_ draw per token from the row's
    seeded generator gives (transformers' multinomial): drawn `ahead` tokens at once, in a
    worker thread or not."""
    from concurrent.futures import ThreadPoolExecutor

    generator = torch.Generator().manual_seed(3)
    expected = [torch.empty(50).exponential_(generator=generator).numpy() for _ in range(11)]
    with ThreadPoolExecutor(max_workers=1) as worker:
        for pool, ahead in ((worker, 4), (worker, 1), (None, 4)):
            noise = _Noise(3, 50, pool, ahead=ahead)
            assert all(np.array_equal(noise.next(), e) for e in expected), (pool, ahead)
