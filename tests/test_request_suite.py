"""The any-request suite: requests drawn evenly over keys, meters, lengths, task kinds and
languages (not shaped like the corpus), and its report of how far a model follows them."""
from __future__ import annotations

import collections
import random
from pathlib import Path

import music21
import pytest

from imelodist_lib import abc
from imelodist_lib import request_suite as rs
from imelodist_lib.corpus import TuneRecord
from imelodist_lib.inference import Composer, Composition
from imelodist_lib.profiles import get_profile


def records(collection: str, pattern: str, n: int) -> list[TuneRecord]:
    """Up to n normalised tunes that pass the strict check, from one of music21's bundled ABC collections."""
    out: list[TuneRecord] = []
    for path in sorted((Path(music21.__file__).parent / "corpus" / collection).glob(pattern)):
        for i, text in enumerate(abc.split_tunes(path.read_text(encoding="latin-1"))):
            try:
                tune = abc.normalize(text)
                report = abc.validate(tune)
                if not report.ok or report.bars.errors or "V:" in tune:
                    continue
            except abc.ABCError:
                continue
            out.append(TuneRecord(id=f"{collection}/{path.name}#{i}", abc=tune, source=collection))
            if len(out) == n:
                return out
    return out


@pytest.fixture(scope="module")
def held_out() -> list[TuneRecord]:
    return records("oneills1850", "*.abc", 40) + records("essenFolksong", "han*.abc", 40)


@pytest.fixture(scope="module")
def suite(held_out) -> list:
    return rs.any_request_suite(held_out, n=80, seed=0)


def test_every_field_is_drawn_evenly(suite):
    counts = {f: collections.Counter(getattr(r, f) for r in suite if r.task != "continue")
              for f in ("key", "meter")}
    assert set(counts["key"]) <= set(rs.SUITE_KEYS) and len(counts["key"]) >= 30
    tasks = collections.Counter((r.task, r.lang) for r in suite)
    assert len(tasks) == 8 and set(tasks.values()) == {10}  # 4 composing kinds x zh/en
    assert set(counts["meter"]) == set(rs.SUITE_METERS)
    lengths = collections.Counter(r.bars if r.task == "emotion" else len(r.chords)
                                  for r in suite if r.task in ("emotion", "chords", "theme_chords"))
    assert set(lengths) <= set(rs.SUITE_LENGTHS) and len(lengths) >= 6


def test_the_deal_is_even_before_tasks_are_applied():
    rng = random.Random(0)
    dealt = rs._dealt(rs.SUITE_KEYS, 3 * len(rs.SUITE_KEYS) + 5, rng)
    counts = collections.Counter(dealt)
    assert set(counts) == set(rs.SUITE_KEYS) and max(counts.values()) - min(counts.values()) <= 1


def test_chord_requests_have_a_chord_per_asked_bar_on_the_keys_triads(suite):
    for r in suite:
        if r.task in ("chords", "theme_chords"):
            assert r.chords[0] == r.chords[-1]  # tonic first and last
            # on the key's tonic (spelled as the labeller spells it: Cb major's tonic chord is B)
            assert rs._root_pc(r.chords[0]) == rs._root_pc(abc.parse_key(r.key).tonic)
    assert rs.chord_progression("G", 4, random.Random(0))[-2] == "D"  # the dominant before the end
    assert rs.chord_progression("Am", 6, random.Random(0))[-2] == "E"  # harmonic-minor V


def test_continuations_are_held_out_openings_in_the_asked_key(suite, held_out):
    titles = {abc.parse_tune(t.abc).title for t in held_out}
    conts = [r for r in suite if r.task == "continue"]
    assert len(conts) == 20
    for r in conts:
        seed = abc.parse_tune(r.seed_abc)
        assert seed.title in titles and seed.key == r.key and seed.meter == r.meter
        assert r.bars in rs.SUITE_LENGTHS and r.tempo is None
    moved = sum(abc.parse_key(r.key).tonic != abc.parse_key(next(
        abc.parse_tune(t.abc).key for t in held_out if abc.parse_tune(t.abc).title ==
        abc.parse_tune(r.seed_abc).title)).tonic for r in conts)
    assert moved >= 5  # openings are moved to the drawn tonic, not left in the corpus's keys


def answer(request, text: str, finish: str = "stop") -> Composition:
    return Composition(abc=text, text=text, request=request, prompt_tokens=0, completion_tokens=0,
                       seconds=1.0, first_token_seconds=None, finish_reason=finish)


def test_the_report_scores_the_human_continuation_as_following(held_out):
    """The held-out tune itself answers its own continuation: key, meter, given bars all kept;
    a cut-off copy counts as truncated; the report says which targets are met."""
    requests = [r for r in rs.any_request_suite(held_out, n=24, seed=3) if r.task == "continue"]
    answers = []
    for r in requests:
        given = r.seed_abc.split(f"K:{r.key}\n", 1)[1].strip()
        title = abc.parse_tune(r.seed_abc).title
        whole = next(moved for t in held_out if abc.parse_tune(t.abc).title == title
                     for moved in (abc.transpose(t.abc, s) for s in range(-6, 7))
                     if moved.split(f"K:{r.key}\n", 1)[-1].startswith(given))
        answers.append([answer(r, whole)])  # the held-out tune, moved as the suite moved it
    answers[0] = [answer(requests[0], answers[0][0].abc, finish="length")]
    rows = rs.follow_rows(requests, answers)
    table = {t["metric"]: t for t in rs.follow_report(rows)}
    assert table["key_match"]["value"] == 1.0 and table["meter_match"]["value"] == 1.0
    assert table["reproduced"]["value"] == 1.0 and table["reproduced"]["meets"] is True
    assert table["bar_error_rate"]["value"] == 0.0
    assert table["truncated"]["value"] == pytest.approx(1 / len(requests))
    assert table["truncated"]["meets"] is False  # 1 of 3 > 2 %
    assert "| asked key written | 100.0 %" in rs.markdown(rs.follow_report(rows))


def test_guaranteed_valid_mode_follows_unusual_keys_and_meters(held_out):
    """The shipped model under each request's grammar, on the suite's odd corners (7 flats,
    7 sharps, Lydian, 9/8, C|, 3/8): key and meter always written, no wrong-length bar."""
    requests = [rs.ComposeRequest("emotion", "en", emotion="calm", key="Cb", meter="9/8", bars=4),
                rs.ComposeRequest("chords", "zh", chords=rs.chord_progression("A#m", 4, random.Random(0)),
                                  key="A#m", meter="C|"),
                rs.ComposeRequest("emotion", "zh", emotion="欢快", key="Flyd", meter="3/8", bars=4)]
    composer = Composer(profile=get_profile("cpu", max_new_tokens=160))
    answers = composer.compose_many(requests, seed=0, constrained=True)
    table = {t["metric"]: t for t in rs.follow_report(rs.follow_rows(requests, answers))}
    assert table["key_match"]["value"] == 1.0 and table["meter_match"]["value"] == 1.0
    assert table["bar_error_rate"]["value"] == 0.0 and table["valid"]["value"] == 1.0
