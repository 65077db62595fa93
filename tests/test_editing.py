"""Editing with the shipped IMelodist-tiny: regenerate chosen bars (everything else kept byte
for byte, the new bars exactly as long as the old), rank by the kept suffix, harmonise."""
import pytest

from imelodist_lib import abc
from imelodist_lib.editing import (bar_spans, chord_vocabulary, harmonise, harmonise_grammar, regenerate,
                                   strip_chords, suffix_logprob)
from imelodist_lib.instructions import ComposeRequest

# a pickup, a |: :| repeat with first and second endings, chord symbols, a triplet, a tie
JIG = """X:1
T:Editing test jig
M:6/8
L:1/8
K:G
D|:"G"GAB "D"d2e-|"G"edB "C"c3|
[1 "D"ABc d2D:|[2 "D"ABc dBA|"G"(3GAB c G3|]
"""
REEL = """X:1
T:Editing test reel
M:4/4
L:1/8
K:D
|:DFAF DFAF|GBdB GBdB|AFDF AFDF|E2FE D4:|
|:dfaf dfaf|gbgb e2fe|dBAF GFED|E2FE D4:|
"""


def contents(text: str) -> list[str]:
    return [text[s.start:s.end] for s in bar_spans(text)]


def test_bar_spans_hold_each_bars_contents_without_bar_lines_or_ending_marks():
    assert contents(JIG) == ["D", '"G"GAB "D"d2e-', '"G"edB "C"c3', '"D"ABc d2D', '"D"ABc dBA',
                             '"G"(3GAB c G3']
    assert [s.kind for s in bar_spans(JIG)] == ["pickup", "full", "full", "ending", "ending", "full"]
    assert contents(REEL)[3] == "E2FE D4" and contents(REEL)[4] == "dfaf dfaf"


@pytest.mark.parametrize("tune,bars", [(JIG, range(0, 1)), (JIG, range(2, 4)), (JIG, range(5, 6)),
                                       (REEL, range(0, 2)), (REEL, range(3, 5)), (REEL, range(7, 8))])
def test_regenerate_keeps_every_other_bar_and_fills_the_new_ones_exactly(composer, tune, bars):
    [r] = regenerate(composer, tune, bars, seed=3)
    old, new = bar_spans(tune), bar_spans(r.abc)
    assert len(new) == len(old)
    assert r.abc[: new[bars.start].start] == tune[: old[bars.start].start]  # header + bars before
    assert r.abc[new[bars.stop - 1].end:] == tune[old[bars.stop - 1].end:]  # bars after, bar lines
    old_bars, new_bars = abc.check_bars(tune).bars, abc.check_bars(r.abc).bars
    for k in range(len(old)):
        if k in bars:
            assert new[k].duration == old[k].duration  # a pickup stays a pickup
            assert new[k].chord == old[k].chord  # the bar's chord symbol is kept
            assert new_bars[k].ending == old_bars[k].ending
        else:
            assert new_bars[k].text == old_bars[k].text and contents(r.abc)[k] == contents(tune)[k]
    assert r.new_bars == [contents(r.abc)[k] for k in bars]
    assert r.report.ok and not r.report.bars.errors


def test_regenerate_refuses_bad_ranges(composer):
    for bars, message in [(range(6, 7), "outside the tune: it has 6 bars"), (range(2, 2), "non-empty"),
                          (range(-1, 1), "outside"), (range(0, 4, 2), "step 1"), ([1, 2], "range")]:
        with pytest.raises(ValueError, match=message):
            regenerate(composer, JIG, bars)
    with pytest.raises(ValueError, match="no meter"):
        regenerate(composer, "X:1\nL:1/8\nK:C\nCDEF GABc|", range(0, 1))


def test_rank_by_suffix_keeps_the_candidates_that_make_the_suffix_likeliest(composer):
    ranked = regenerate(composer, REEL, range(2, 3), n=2, seed=0, rank_by_suffix=True, candidates=3)
    assert len(ranked) == 2 and all(r.candidates == 3 for r in ranked)
    assert ranked[0].suffix_logprob >= ranked[1].suffix_logprob
    messages = composer.messages_for(ComposeRequest("continue", seed_abc=REEL[: bar_spans(REEL)[2].start].strip()))
    cut = bar_spans(ranked[0].abc)[2].end
    again = suffix_logprob(composer, messages, ranked[0].abc[:cut], ranked[0].abc[cut:])
    assert again == pytest.approx(ranked[0].suffix_logprob, abs=1e-3)
    assert again < 0


def test_harmonise_keeps_the_melody_and_writes_one_chord_per_bar(composer):
    h = harmonise(composer, JIG, seed=0)
    assert strip_chords(h.abc) == strip_chords(JIG)
    assert len(h.chords) == len(bar_spans(JIG)) and set(h.chords) <= set(chord_vocabulary("G"))
    assert h.report.ok and not h.report.bars.errors
    wide = harmonise(composer, REEL, vocabulary="all", seed=1)
    assert strip_chords(wide.abc) == REEL and len(wide.chords) == 8
    with pytest.raises(ValueError, match="'key' or 'all'"):
        harmonise(composer, REEL, vocabulary="jazz")


def test_chord_vocabulary_of_a_key_and_of_all_keys():
    assert chord_vocabulary("G") == ["G", "Am", "Bm", "C", "D", "Em", "D7"]
    assert {"Am", "Dm", "E", "E7"} <= set(chord_vocabulary("Am"))
    assert len(chord_vocabulary("F", region=False)) == 36 and "Bb7" in chord_vocabulary("F", region=False)


def test_composer_methods_delegate_to_editing(composer):
    [r] = composer.regenerate(REEL, bars=range(5, 7), seed=2)
    assert r.abc == regenerate(composer, REEL, range(5, 7), seed=2)[0].abc
    assert contents(r.abc)[:5] == contents(REEL)[:5] and contents(r.abc)[7:] == contents(REEL)[7:]
    h = composer.harmonise(JIG, lang="en", seed=4)
    assert h.abc == harmonise(composer, JIG, lang="en", seed=4).abc and strip_chords(h.abc) == strip_chords(JIG)


def test_a_harmonise_request_composed_in_guaranteed_valid_mode_uses_the_harmonise_grammar(composer):
    from imelodist_lib.grammar import grammar_for_request, token_budget

    request = ComposeRequest("harmonise", "en", melody=REEL)
    assert grammar_for_request(request) == harmonise_grammar(REEL)
    assert token_budget(request) >= len(REEL)
    [comp] = composer.compose(request, constrained=True, seed=5)
    assert comp.ok and strip_chords(comp.text) == REEL  # every note forced
    assert comp.text == harmonise(composer, REEL, lang="en", seed=5).abc  # the same prompt and grammar
    assert len(abc.QUOTED_CHORD_RE.findall(comp.text)) == 8


def test_harmonise_refuses_a_melody_with_a_wrong_bar_length():
    with pytest.raises(ValueError, match="1 bar\\(s\\) of the wrong length"):
        harmonise_grammar("X:1\nM:4/4\nL:1/8\nK:C\nCDEF GABc|CDE GABc|c8|]\n")


def test_editing_evaluation_reports_harmonise_adherence_and_regenerated_bar_validity(composer):
    from imelodist_lib import evaluation as ev
    from imelodist_lib.instructions import chords_per_bar

    result = ev.editing_evaluation(composer, [JIG, REEL], seed=1, lang="en")
    jig, reel = result.rows
    assert (jig["bars"], reel["bars"]) == (6, 8)
    assert jig["adherence_human"] == ev.chord_adherence(ev.parse_answer(strip_chords(JIG)),
                                                        chords_per_bar(JIG))  # every bar of JIG has one
    assert reel["adherence_human"] is None  # no human chords to compare with
    model_chords = harmonise(composer, REEL, lang="en", seed=2).chords  # tune i is seeded seed + i
    assert reel["adherence_model"] == ev.chord_adherence(ev.parse_answer(REEL), model_chords)
    assert result.metric("regenerate_valid").mean == 1.0 and result.metric("regenerate_kept").mean == 1.0
    assert result.metric("harmonise_adherence_human").n == 1 and result.metric("harmonise_adherence_model").n == 2
    assert all(0 <= s.ci_low <= s.mean <= s.ci_high <= 1 for s in result.summary)
    assert ev.editing_tunes([JIG, REEL, "X:1\nK:C\nCDE|"], 5, min_bars=8) == [abc.normalize(REEL)]
