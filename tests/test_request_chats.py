"""Training chats drawn like the any-request suite: every answer is the request kept exactly."""
from __future__ import annotations

import collections

import pytest

from imelodist_lib import abc
from imelodist_lib import request_chats as rc
from imelodist_lib.evaluation import score_answer
from imelodist_lib.instructions import ComposeRequest
from tests.test_request_suite import records

TWO_FOUR = "X:1\nT:t\nM:2/4\nL:1/8\nK:G\nD|GA Bc|d2 B2|c2 A2|G4:|\n|:d2 d2|e2 c2|B2 A2|G4:|\n"


def test_join_bar_pairs_joins_plain_barlines_within_sections():
    joined = rc.join_bar_pairs(TWO_FOUR)
    assert joined.count("|") == TWO_FOUR.count("|") - 4
    report = abc.validate(joined.replace("M:2/4", "M:4/4"))
    assert report.ok and not report.bars.errors
    assert [b.kind for b in report.bars.bars][:2] == ["pickup", "full"]


@pytest.mark.parametrize("text", [
    "X:1\nM:2/4\nL:1/8\nK:G\nGA Bc|d2 B2|c2 A2:|\n",  # a section of three bars
    "X:1\nM:2/4\nL:1/8\nK:G\n|:GA Bc|d2 B2|1c2 A2|G4:|2c2 B2|G4|]\n",  # endings
])
def test_join_bar_pairs_refuses_what_it_cannot_do_exactly(text):
    with pytest.raises(ValueError):
        rc.join_bar_pairs(text)


def test_meter_variants_are_exact_rewrites():
    waltz = "X:1\nM:3/4\nL:1/8\nK:D\nA2 d2 f2|e4 d2|c2 B2 A2|d6|]\n"
    variants = dict(rc.meter_variants(waltz, "3/4"))
    assert set(variants) == {"3/4", "3/8"}
    assert "L:1/16" in variants["3/8"] and variants["3/8"].split("K:D")[1] == waltz.split("K:D")[1]
    common = "X:1\nM:C\nL:1/8\nK:D\nA2 d2 f2 e2|d8|]\n"
    assert dict(rc.meter_variants(common, "C"))["4/4"].count("M:4/4") == 1
    assert set(dict(rc.meter_variants(TWO_FOUR, "2/4"))) == {"2/4", "4/4"}


@pytest.fixture(scope="module")
def train_tunes():
    tunes = records("oneills1850", "*.abc", 150) + records("essenFolksong", "han*.abc", 60)
    return [t.__class__(**{**t.to_dict(), "split": "train"}) for t in tunes]


def test_request_chats_answers_keep_every_stated_field(train_tunes):
    chats = rc.request_chats(train_tunes, 40, seed=3)
    assert len(chats) >= 36  # a draw no tune serves is left out, not answered wrongly
    assert collections.Counter(c["task"] for c in chats).most_common(1)[0][1] <= 11
    for chat in chats:
        request = ComposeRequest(**chat["request"])
        answer = chat["messages"][-1]["content"]
        row = score_answer(request, answer)
        assert row["valid"] == 1 and row["bar_errors"] == 0, answer
        assert row["key_match"] == 1.0 and row["meter_match"] == 1.0, (request.key, request.meter, answer)
        if request.bars is not None:
            assert row["length_match"] == 1.0
        if request.task == "continue":
            assert row["continued"] == 1.0 and answer.startswith(request.seed_abc.rstrip("\n"))
        if request.chords is not None:
            assert len(request.chords) == row["bars"]
    meters = {c["request"]["meter"] for c in chats}
    modes = {abc.parse_key(c["request"]["key"]).mode for c in chats}
    assert len(meters) >= 6 and {"major", "minor"} <= modes


def test_request_chats_are_seeded(train_tunes):
    assert rc.request_chats(train_tunes, 6, seed=1) == rc.request_chats(train_tunes, 6, seed=1)


def test_copy_chats_ask_to_copy_a_valid_random_tune_and_answer_it_exactly():
    chats = rc.copy_chats(40, seed=3)
    assert [c["task"] for c in chats] == [rc.COPY_TASK] * 40
    assert {c["messages"][1]["content"].split("\n")[0][-1] for c in chats} <= {":", "："}
    tunes = set()
    for c in chats:
        user, answer = c["messages"][1]["content"], c["messages"][2]["content"]
        assert user.endswith("\n" + answer)  # the tune asked for is the answer, byte for byte
        report = abc.validate(answer)
        assert report.ok and not report.bars.errors, answer
        assert 2 <= len([b for b in report.bars.bars if b.kind != "pickup"]) <= 8
        tunes.add(answer)
    assert len(tunes) == 40 and rc.copy_chats(40, seed=3) == chats and rc.copy_chats(40, seed=4) != chats
    with pytest.raises(ValueError):
        rc.random_bars(__import__("random").Random(0), "G", "5/4", 4)


def test_altered_notes_change_letters_only_where_notes_are():
    body = '"Am"A2 !trill!B c/d/ [CEG] ^f\'2 [K:D] G, % a comment: ABC\n'
    rng = __import__("random").Random(1)
    changed = rc.altered_notes(body, rng, share=1.0)
    assert changed != body
    assert changed.startswith('"Am"') and "!trill!" in changed and "[K:D]" in changed
    assert changed.endswith("% a comment: ABC\n")
    # every note keeps its accidental, octave mark and length; only the letter moves
    keep = lambda t: __import__("re").sub(r'"[^"]*"|![^!]*!|\[K:[^\]]*\]|%.*', "", t)
    assert [(a.isupper(), a.isalpha()) for a in keep(body)] == [(b.isupper(), b.isalpha()) for b in keep(changed)]
    assert [a for a in keep(body) if not a.isalpha()] == [b for b in keep(changed) if not b.isalpha()]
    assert rc.altered_notes(body, rng, share=0.0) == body


def test_varied_continuations_start_with_their_altered_given_bars(train_tunes):
    chats = rc.varied_continuations(train_tunes, 12, seed=2)
    plain = rc.request_chats(train_tunes, 12, seed=2, tasks=("continue",))
    assert len(chats) >= 10 and {c["request"]["task"] for c in plain} == {"continue"}
    altered = 0
    for chat in chats:
        request = ComposeRequest(**chat["request"])
        answer = chat["messages"][-1]["content"]
        assert request.seed_abc.strip() in chat["messages"][1]["content"]
        row = score_answer(request, answer)
        assert row["valid"] == 1 and row["bar_errors"] == 0 and row["continuation_fidelity"] == 1.0, answer
        altered += request.seed_abc not in {c["request"]["seed_abc"] for c in plain}
    assert altered >= len(chats) - 1  # the given bars are not the corpus's own
    with pytest.raises(ValueError):
        rc.altered_opening(rc.copy_chats(1)[0], __import__("random").Random(0))
    with pytest.raises(ValueError):
        rc.request_chats(train_tunes, 2, tasks=("harmonise",))
