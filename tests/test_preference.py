"""Preference tuning's reward and pairing, on real tunes (O'Neill's 1850, music21's corpus)."""
import dataclasses
import re

import pytest
from internlm2_reference import oneills_tunes

from imelodist_lib import preference as pf
from imelodist_lib.evaluation import NoveltyIndex, parse_answer
from imelodist_lib.instructions import ComposeRequest, _seed_bars, close_phrase, count_bars


@pytest.fixture(scope="module")
def clean_tunes():
    """The first O'Neill tunes that parse with every bar the right length (real human answers)."""
    out = []
    for text in oneills_tunes()[:80]:
        try:
            tune = parse_answer(text)
        except Exception:
            continue
        if tune.bar_errors == 0 and tune.key and tune.meter and len(tune.bars) >= 8:
            out.append((text, tune))
        if len(out) == 6:
            break
    assert len(out) == 6
    return out


def _request(tune, task="emotion"):
    return ComposeRequest(task=task, lang="en", emotion="joyful", key=tune.key, meter=tune.meter)


def _rekeyed(text: str, key: str) -> str:
    return re.sub(r"^K:.*$", f"K:{key}", text, count=1, flags=re.M)


def test_rewards_order_human_wrong_key_and_garbage(clean_tunes):
    text, tune = clean_tunes[0]
    request = _request(tune)
    other = "F#m" if not tune.key.startswith("F#") else "Bb"
    scored = pf.score_answers(request, [text, _rekeyed(text, other), "I cannot write music today."],
                              stopped=[True, True, False])  # the prose ran into the token limit
    human, wrong_key, prose = scored
    assert human.parts["valid"] == 1 and human.parts["adherence"] == 1 and human.parts["bar_accuracy"] == 1
    assert wrong_key.parts["adherence"] < 1 and wrong_key.reward < human.reward
    assert prose.parts == {"valid": 0.0, "bar_accuracy": 0.0, "adherence": 0.0, "length": 0.0, "stopped": 0.0,
                           "repetition": 0.0, "rhythm": 0.0, "near_copy": 0.0}
    [cut] = pf.score_answers(request, [text], stopped=[False])  # the same tune, cut off by the limit
    assert cut.parts["stopped"] == 0.0 and human.parts["stopped"] == 1.0
    assert cut.reward == human.reward - pf.REWARD_WEIGHTS["stopped"]
    assert prose.reward == 0.0 < wrong_key.reward
    pair = pf.best_worst_pair(scored)
    assert pair.chosen is human and pair.rejected is prose and pair.margin == human.reward


def test_length_part_ranks_answers_by_how_near_they_come_to_the_asked_bars(clean_tunes):
    text, tune = clean_tunes[0]
    n = count_bars(text)
    asked = dataclasses.replace(_request(tune), bars=n, chords=None)
    short, half, whole = pf.score_answers(asked, [close_phrase(_seed_bars(text, 2)),
                                                 close_phrase(_seed_bars(text, n // 2)), text])
    assert whole.parts["length"] == 1.0 > half.parts["length"] > short.parts["length"] > 0.0
    assert half.parts["length"] == pytest.approx(1 - (n - count_bars(half.text)) / n)
    unasked = dataclasses.replace(asked, bars=None)
    assert pf.score_answers(unasked, [text])[0].parts["length"] == 1.0  # nothing asked: valid is enough


def test_near_copy_of_a_training_tune_is_penalised(clean_tunes):
    (text, tune), (other_text, _) = clean_tunes[0], clean_tunes[1]
    index = NoveltyIndex([text])
    copy, fresh = pf.score_answers(_request(tune), [text, other_text], novelty=index)
    assert copy.parts["near_copy"] == 1.0 and fresh.parts["near_copy"] == 0.0
    assert copy.reward == pytest.approx(pf.total_reward({**copy.parts, "near_copy": 0.0}) - 2.0)


def test_pairs_need_a_margin_and_two_different_texts(clean_tunes):
    text, tune = clean_tunes[0]
    request = _request(tune)
    assert pf.best_worst_pair(pf.score_answers(request, [text, text])) is None
    assert pf.best_worst_pair(pf.score_answers(request, [text])) is None
    close = pf.score_answers(request, [text, clean_tunes[2][0]])
    assert (pf.best_worst_pair(close, min_margin=10.0) is None)
    pairs = pf.preference_pairs([pf.score_answers(request, [text, "not a tune"], messages=[
        {"role": "system", "content": "s"}, {"role": "user", "content": "u"}])])
    ds = pf.dpo_dataset(pairs)
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds[0]["chosen"] == [{"role": "assistant", "content": text}]
    assert ds[0]["prompt"][1] == {"role": "user", "content": "u"}
    with pytest.raises(ValueError, match="no preference pairs"):
        pf.dpo_dataset([])


def test_human_statistics_and_reward_table(clean_tunes):
    human = pf.human_statistics([t for t, _ in clean_tunes])
    assert 0.0 <= human["repeated_bar_share"] < 1.0 and human["rhythm_entropy"] > 0.0
    per_request = [pf.score_answers(_request(tune), [text, "garbage"], human) for text, tune in clean_tunes[:3]]
    rows = pf.reward_table({"human+garbage": per_request})
    valid = next(r for r in rows if r["metric"] == "valid")
    assert valid["mean"] == 0.5 and valid["n"] == 6
    assert 0.0 <= valid["ci_low"] <= 0.5 <= valid["ci_high"] <= 1.0
    assert {r["metric"] for r in rows} == {"reward", *pf.PART_NAMES}


def test_training_requests_drawn_like_the_any_request_suite(clean_tunes):
    from imelodist_lib.corpus import TuneRecord
    from imelodist_lib.profiles import get_profile
    from imelodist_lib.request_suite import SUITE_KEYS

    records = [TuneRecord(id=f"oneill/{i}", abc=text, source="oneill") for i, (text, _) in enumerate(clean_tunes)]
    requests = pf.training_requests(records, get_profile("cpu"), 12, source="any", seed=3)
    assert len(requests) == 12 and {r.task for r in requests} == {"emotion", "chords", "theme_chords", "continue"}
    assert all(r.key in SUITE_KEYS for r in requests if r.task != "continue")
    assert len({r.meter for r in requests}) >= 6  # dealt evenly over the suite's ten, not the tunes' own
    assert all(r.seed_abc for r in requests if r.task == "continue")  # openings of these tunes
    with pytest.raises(ValueError, match="source must be one of"):
        pf.training_requests(records, get_profile("cpu"), 2, source="suite")
