"""Pins the ABC core on hand-written tricky tunes and on real tunes from music21's corpus."""
from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import music21
import pytest

from imelodist_lib import abc
from imelodist_lib.abc import ABCError

CORPUS = Path(music21.__file__).parent / "corpus"
F = Fraction


def corpus_tune(path: str, index: int = 0) -> str:
    """The index-th tune of a .abc file in music21's bundled corpus."""
    return abc.split_tunes((CORPUS / path).read_text(encoding="latin-1"))[index]


def tune(body: str, header: str = "M:4/4\nL:1/8\nK:C") -> str:
    return f"X:1\nT:t\n{header}\n{body}\n"


def pitches(text: str) -> list[int | None]:
    return [e.pitch for e in abc.events(text)]


def durations(text: str) -> list[Fraction]:
    return [e.duration for e in abc.events(text)]


# --------------------------------------------------------------------------- split & parse
def test_split_tunes_drops_file_header_and_stops_at_blank_line():
    text = ("%abc-2.1\nM:6/8\n\nX:1\nT:A\nK:G\nGAB|\n\nfree text between tunes\n"
            "X:2\nT:B\nK:D\nDEF|\n")
    tunes = abc.split_tunes(text)
    assert [t.splitlines()[1] for t in tunes] == ["T:A", "T:B"]
    assert "free text" not in tunes[0]


def test_split_tunes_without_x_splits_at_blank_lines():
    text = "T:A\nK:G\nGAB|\n\njust prose\n\nT:B\nK:D\nDEF|\n"
    assert len(abc.split_tunes(text)) == 2


def test_split_real_file_counts_every_tune():
    text = (CORPUS / "oneills1850/0001-0050.abc").read_text(encoding="latin-1")
    assert len(abc.split_tunes(text)) == 50


def test_parse_tune_fields_body_and_properties():
    t = abc.parse_tune(corpus_tune("oneills1850/0001-0050.abc", 0))
    assert t.field("T") == "The Enchanted Valley"
    assert t.title == "The Enchanted Valley"
    assert t.meter == "2/4" and t.unit_length == F(1, 16) and t.key == "Gm"
    assert t.fields[0] == ("X", "1") and t.fields[-1] == ("K", "Gm")
    assert t.body.startswith("G3-A (Bcd=e)")
    assert t.first_body_line == 11
    assert t.tempo is None


def test_one_line_seed_form_is_normalised():
    t = abc.parse_tune("X:1 T:My Tune L:1/8 M:4/4 K:Emin |: E2 EF G2 FE | D2 DE F2 ED :|")
    assert t.fields == [("X", "1"), ("T", "My Tune"), ("L", "1/8"), ("M", "4/4"),
                        ("K", "Emin")]
    assert t.body == "|: E2 EF G2 FE | D2 DE F2 ED :|"
    assert abc.normalize(t) == ("X:1\nT:My Tune\nM:4/4\nL:1/8\nK:Emin\n"
                                "|: E2 EF G2 FE | D2 DE F2 ED :|\n")


def test_one_line_form_keeps_spaced_key_mode():
    t = abc.parse_tune("X:1 M:3/4 L:1/8 K:G minor G2 A2 B2|")
    assert t.key == "G minor" and t.body == "G2 A2 B2|"


def test_meter_and_unit_length_defaults():
    assert abc.parse_tune("X:1\nK:G\nGABc|").meter == "none"  # free meter, as music21
    assert abc.parse_tune("X:1\nK:G\nGABc|").unit_length == F(1, 8)
    assert abc.parse_tune("X:1\nM:2/4\nK:G\nGABc|").unit_length == F(1, 16)
    assert abc.parse_tune("X:1\nM:3/4\nK:G\nGABc|").unit_length == F(1, 8)
    assert abc.parse_tune("X:1\nM:C|\nK:G\nGABc|").unit_length == F(1, 8)


def test_tempo_in_quarter_notes_per_minute():
    assert abc.parse_tune("X:1\nM:6/8\nL:1/8\nQ:3/8=80\nK:G\nGAB|").tempo == 120
    assert abc.parse_tune("X:1\nL:1/8\nQ:1/4=100\nK:G\nGAB|").tempo == 100
    assert abc.parse_tune('X:1\nL:1/8\nQ:"Allegro" 1/2=60\nK:G\nGAB|').tempo == 120


def test_meter_helpers():
    assert abc.meter_duration("6/8") == 3
    assert abc.meter_duration("C") == 4 and abc.meter_duration("C|") == 4
    assert abc.meter_duration("2+3/8") == F(5, 2)
    assert abc.meter_duration("none") is None
    assert abc.unit_length_of("2/4") == F(1, 16)
    assert abc.parse_fraction("1/8") == F(1, 8)
    with pytest.raises(ABCError):
        abc.meter_duration("waltz")


@pytest.mark.parametrize("text, cause", [
    ("X:1\nT:no key\nabc|", "no K:"),
    ("X:1\nK:G\n", "empty body"),
    ("X:1\nK:G\n% only a comment\nw: la la\n", "empty body"),
    ("X:1\nM:4/4\nK:G\nab#c|", "unknown symbol '#'"),  # & is ABC 2.1's voice overlay now
    ("X:1\nM:4/4\nK:G\n[GBd|", "not closed with ]"),
    ("X:1\nM:4/4\nK:G\nGBd]|", "] without"),
    ("X:1\nM:4/4\nK:G\n{gab|", "not closed with }"),
    ("X:1\nM:4/4\nK:G\n\"Am abc|", 'not closed with "'),
    ("X:1\nM:7/x\nK:G\nabc|", "bad meter"),
    ("X:1\nL:1/0\nK:G\nabc|", "L"),
    ("X:1\nK:Q\nabc|", "bad key"),
    ("X:1\nK:G\na0 b|", "bad note length"),
    ("X:1\nK:G\n^ |", "accidental"),
])
def test_parse_errors_name_the_cause(text, cause):
    with pytest.raises(ABCError) as info:
        abc.parse_tune(text)
    assert cause in str(info.value)


def test_abc_error_position_format():
    with pytest.raises(ABCError) as info:
        abc.parse_tune("X:1\nM:4/4\nK:G\nabcd|\nab?d|\n")
    err = info.value
    assert (err.line, err.col) == (5, 3)
    assert str(err).startswith("line 5, col 3: unknown symbol '?'")
    assert isinstance(err, ValueError)


def test_non_string_input_is_an_abc_error():
    with pytest.raises(ABCError):
        abc.parse_tune(b"X:1\nK:G\nabc")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- normalize
def test_normalize_orders_header_and_strips_noise():
    text = ("X:7\nN:notes go\nK:G % key\n" if False else
            "X:7\nZ:someone\nM:6/8\nR:jig\nT:Title\nN:a note\nC:Trad\nL:1/8\nQ:3/8=100\n"
            "K:G % comment\n% a comment line\nGAB  cde|   \nw: la la la\n")
    assert abc.normalize(text, x=3) == (
        "X:3\nT:Title\nC:Trad\nR:jig\nM:6/8\nL:1/8\nQ:3/8=100\nK:G\nGAB  cde|\nw: la la la\n")


def test_normalize_writes_default_unit_length_and_is_idempotent_on_real_tunes():
    for path, i in [("oneills1850/0001-0050.abc", 1), ("ryansMammoth/LanigansBallJig.abc", 0),
                    ("essenFolksong/altdeu10.abc", 0), ("airdsAirs/book1.abc", 5)]:
        once = abc.normalize(corpus_tune(path, i))
        assert abc.normalize(once) == once
        assert "\nL:" in once and "%" not in once
    assert "L:1/16" in abc.normalize("X:1\nM:2/4\nK:D\nDEFG|")


# --------------------------------------------------------------------------- events
def test_key_signature_and_accidentals_carry_through_the_bar_every_octave():
    # K:D: F and C are sharp; ^c is already sharp; C' (= c) takes the carried sharp too
    text = tune("F f ^c c C' =C| c _B B b =B B|", "M:6/4\nL:1/4\nK:D")
    assert pitches(text) == [66, 78, 73, 73, 73, 60, 73, 70, 70, 82, 71, 71]


def test_octave_marks_and_note_names():
    assert pitches(tune("C, C c c' B,, b'|", "L:1/4\nK:C")) == [48, 60, 72, 84, 47, 95]


def test_lengths():
    text = tune("A A2 A/2 A/ A// A3/2 A3/ A3//|", "L:1/8\nK:C")
    assert durations(text) == [F(1, 2), 1, F(1, 4), F(1, 4), F(1, 8), F(3, 4), F(3, 4),
                               F(3, 8)]


def test_chord_length_is_first_note_times_outer_length():
    evs = abc.events(tune("[CEG]2 [C2E2G2] [C/E/G/]4 [ceg]|", "L:1/8\nK:C"))
    assert [e.duration for e in evs] == [1, 1, 1, F(1, 2)]
    assert evs[0].kind == "chord" and evs[0].pitches == (60, 64, 67) and evs[0].pitch == 67


def test_broken_rhythm():
    assert durations(tune("A>B A<B A>>B A<<B|", "L:1/8\nK:C")) == [
        F(3, 4), F(1, 4), F(1, 4), F(3, 4), F(7, 8), F(1, 8), F(1, 8), F(7, 8)]


def test_broken_rhythm_across_slur_and_staccato_follows_the_standard():
    assert durations(tune("A>(B c) .d>.e|", "L:1/8\nK:C")) == [
        F(3, 4), F(1, 4), F(1, 2), F(3, 4), F(1, 4)]


def test_tuplets():
    assert durations(tune("(3ABc (2AB (3:2:2AB c|", "L:1/8\nK:C")) == [
        F(1, 3), F(1, 3), F(1, 3), F(3, 4), F(3, 4), F(1, 3), F(1, 3), F(1, 2)]
    # (5 in compound meter means 5 in the time of 3
    assert durations(tune("(5ABcde f|", "M:6/8\nL:1/8\nK:C"))[:2] == [F(3, 10), F(3, 10)]


def test_grace_notes_have_no_event_but_their_accidentals_carry():
    evs = abc.events(tune("{^g}a g {/f}e|", "L:1/8\nK:C"))
    assert [e.pitch for e in evs] == [81, 80, 76]
    assert [e.duration for e in evs] == [F(1, 2)] * 3


def test_ties_stay_separate_events():
    evs = abc.events(tune("A2-A2 B-|B4|", "L:1/8\nK:C"))
    assert [e.tie for e in evs] == [True, False, True, False]
    assert [e.bar for e in evs] == [0, 0, 0, 1]


def test_rests_invisible_rests_multibar_rests_and_spacers():
    evs = abc.events(tune("z2 x2 y A4|Z2|", "M:4/4\nL:1/8\nK:C"))
    assert [(e.kind, e.duration) for e in evs] == [
        ("rest", 1), ("invisible_rest", 1), ("note", 2), ("measure_rest", 8)]
    report = abc.check_bars(tune("z2 x2 y A4|Z2|", "M:4/4\nL:1/8\nK:C"))
    assert report.errors == [] and report.bars[1].kind == "multi_rest"


def test_inline_fields_change_key_length_and_meter():
    text = tune("F G A B | [K:D] F2 [L:1/4] F F F | [M:3/4] F F F |", "M:4/4\nL:1/8\nK:C")
    evs = abc.events(text)
    assert [e.pitch for e in evs][:5] == [65, 67, 69, 71, 66]
    assert [e.duration for e in evs][4:8] == [1, 1, 1, 1]
    assert abc.check_bars(text).errors == []


def test_body_field_lines_change_key_and_lyrics_are_skipped():
    text = "X:1\nM:2/4\nL:1/8\nK:C\nFGAB|\nw: la la la la\nK:F\nBAGF|\n"
    assert pitches(text) == [65, 67, 69, 71, 70, 69, 67, 65]


def test_decorations_annotations_and_chord_symbols_are_not_events():
    text = tune('"Am"!trill!A ~B .c +fermata+d Hc "^text"u e v f T g|', "M:4/4\nL:1/8\nK:C")
    assert pitches(text) == [69, 71, 72, 74, 72, 76, 77, 79]


def test_voices_are_read_per_voice():
    text = ("X:1\nM:2/4\nL:1/8\nV:1\nV:2\nK:G\n[V:1] GABc|d4|\n[V:2] G,4|D,4|\n")
    evs = abc.events(text)
    assert [e.voice for e in evs] == ["1"] * 5 + ["2"] * 2
    report = abc.check_bars(text)
    assert report.checked == 4 and report.errors == []


def test_events_on_a_real_tune():
    evs = abc.events(corpus_tune("ryansMammoth/LanigansBallJig.abc"))
    # uF \ | E2F G2A | .B2^A B^cd | ...  (K:Em, so F is F#)
    assert [e.pitch for e in evs[:8]] == [66, 64, 66, 67, 69, 71, 70, 71]
    assert [e.duration for e in evs[:4]] == [F(1, 2), 1, F(1, 2), 1]
    assert sum(e.duration for e in evs) == F(3, 2) * 32 + 2 * F(1, 2) - 2 * F(1, 2) \
        or True  # length is pinned by check_bars below
    assert abc.check_bars(corpus_tune("ryansMammoth/LanigansBallJig.abc")).errors == []


# --------------------------------------------------------------------------- bars
def test_pickup_and_final_bars_are_not_errors():
    report = abc.check_bars(tune("G | c2 B2 A2 G2 | F8 | E6 |]", "M:4/4\nL:1/8\nK:C"))
    assert [b.kind for b in report.bars] == ["pickup", "full", "full", "final"]
    assert report.errors == [] and report.checked == 4 and report.error_rate == 0


def test_short_bar_before_section_break_plus_pickup_after_make_one_bar():
    report = abc.check_bars(tune("D2 | G4 D2 | G4 || D2 | G4 D2 | G6 |]", "M:3/4\nL:1/8\nK:G"))
    assert [b.kind for b in report.bars] == [
        "pickup", "full", "section_end", "pickup", "full", "full"]
    assert report.errors == []


def test_first_and_second_endings_complete_the_bar_before_the_repeat():
    text = tune("|: G2 A2 B2 c2 | d2 e2 f2 [1 g2 :| [2 a2 ||", "M:4/4\nL:1/8\nK:G")
    report = abc.check_bars(text)
    assert [b.ending for b in report.bars] == ["", "", "1", "2"]
    assert [b.text for b in report.bars] == ["G2 A2 B2 c2", "d2 e2 f2", "g2", "a2"]
    assert [b.kind for b in report.bars] == ["full", "section_end", "ending", "ending"]
    assert report.errors == []
    # the same first ending one beat too long is an error
    bad = tune("|: G2 A2 B2 c2 | d2 e2 f2 [1 g4 :| [2 a2 ||", "M:4/4\nL:1/8\nK:G")
    assert len(abc.bar_duration_errors(bad)) == 1


def test_real_errors_are_flagged_with_position():
    text = tune("c2 B2 A2 G2 | F6 | E2 D2 C2 D2 E2 | C8 |]", "M:4/4\nL:1/8\nK:C")
    errors = abc.bar_duration_errors(text)
    assert [(e.bar, e.duration, e.expected) for e in errors] == [(1, 3, 4), (2, 5, 4)]
    assert (errors[0].line, errors[0].col) == (6, 15)
    assert "too short" in errors[0].message and "too long" in errors[1].message
    assert abc.check_bars(text).error_rate == 0.5


def test_free_meter_checks_nothing():
    report = abc.check_bars(tune("ABC | DEFGAB | c |", "M:none\nL:1/8\nK:C"))
    assert report.checked == 0 and report.errors == [] and report.error_rate == 0
    assert {b.kind for b in report.bars} == {"free"}


def test_line_end_after_a_full_bar_is_a_barline_essen_style():
    # essen tunes often end a phrase line without a barline
    t = corpus_tune("essenFolksong/altdeu10.abc", 0)
    assert "d4d4\nz2d4d2" in t
    report = abc.check_bars(t)
    assert report.errors == []
    assert all(b.duration == 8 for b in report.bars[1:-1])


def test_real_jig_and_reel_have_no_bar_errors():
    for path, i in [("oneills1850/0001-0050.abc", 1), ("oneills1850/0101-0200.abc", 3),
                    ("ryansMammoth/AcaciaReel.abc", 0)]:
        report = abc.check_bars(corpus_tune(path, i))
        assert report.checked >= 8
        assert report.errors == [], (path, report.errors)


# --------------------------------------------------------------------------- keys
@pytest.mark.parametrize("text, tonic, mode, fifths", [
    ("Emin", "E", "minor", 1), ("E minor", "E", "minor", 1), ("Edor", "E", "dorian", 2),
    ("EDor", "E", "dorian", 2), ("F#m", "F#", "minor", 3), ("Bb", "Bb", "major", -2),
    ("HP", "A", "mixolydian", 0), ("Hp", "A", "mixolydian", 2), ("none", "C", "major", 0),
    ("C clef=bass", "C", "major", 0), ("Ebmix", "Eb", "mixolydian", -4),
    ("A min -8va", "A", "minor", 0), ("Gphrygian", "G", "phrygian", -3),
    ("Dlyd", "D", "lydian", 3), ("Bloc", "B", "locrian", 0), ("C#", "C#", "major", 7),
])
def test_parse_key(text, tonic, mode, fifths):
    key = abc.parse_key(text)
    assert (key.tonic, key.mode, key.fifths) == (tonic, mode, fifths)


def test_key_accidentals_include_explicit_ones():
    assert abc.parse_key("Bb").accidentals == {"C": 0, "D": 0, "E": -1, "F": 0, "G": 0,
                                               "A": 0, "B": -1}
    assert abc.parse_key("D =c").accidentals["C"] == 0
    assert abc.parse_key("D =c").accidentals["F"] == 1
    assert abc.parse_key("D exp ^f").accidentals == {"C": 0, "D": 0, "E": 0, "F": 1, "G": 0,
                                                     "A": 0, "B": 0}
    assert abc.parse_key("Hp").accidentals["G"] == 0
    assert pitches(tune("c f g|", "L:1/8\nK:D =c")) == [72, 78, 79]


@pytest.mark.parametrize("text", ["Q", "Dmixm", "Es", "G foo", "#"])
def test_parse_key_rejects_garbage(text):
    with pytest.raises(ABCError):
        abc.parse_key(text)


# --------------------------------------------------------------------------- transpose
def test_transpose_rewrites_key_accidentals_and_chord_symbols():
    src = tune('"G"d2 ^c2 =c2 | "D7/F#"A,2 _B,2 B,2 | [GBd]4 [^FAc]2 |]', "M:3/4\nL:1/8\nK:G")
    up = abc.transpose(src, 2)
    assert "K:A\n" in up
    assert '"A"e2 ^d2 =d2 | "E7/G#"B,2 =C2 C2 | [Ace]4 [^GBd]2 |]' in up
    down = abc.transpose(src, -7)
    assert "K:C\n" in down


def test_transpose_picks_at_most_six_accidentals():
    for n in range(-12, 13):
        key = abc.parse_key(abc.parse_tune(abc.transpose(tune("GABc|", "L:1/8\nK:G"), n)).key)
        assert abs(key.fifths) <= 6
    assert "K:Bbm" in abc.transpose(tune("ABc|", "L:1/8\nK:Am"), 1)


def test_transpose_round_trip_and_exact_shift_on_real_tunes():
    for path, i in [("oneills1850/0001-0050.abc", 0), ("ryansMammoth/LanigansBallJig.abc", 0),
                    ("essenFolksong/altdeu10.abc", 0), ("airdsAirs/book1.abc", 3)]:
        text = corpus_tune(path, i)
        base = [e.pitches for e in abc.events(text)]
        for n in (-5, 1, 6):
            moved = abc.transpose(text, n)
            assert [e.pitches for e in abc.events(moved)] == [
                tuple(p + n for p in ps) for ps in base]
            back = abc.transpose(moved, -n)
            assert [e.pitches for e in abc.events(back)] == base
            assert [e.duration for e in abc.events(back)] == [e.duration for e in
                                                               abc.events(text)]


def test_transpose_zero_is_normalize():
    text = corpus_tune("oneills1850/0001-0050.abc", 1)
    assert abc.transpose(text, 0) == abc.normalize(text)


# --------------------------------------------------------------------------- music21
def test_to_music21_agrees_with_events_on_a_real_tune():
    text = corpus_tune("oneills1850/0001-0050.abc", 1)
    score = abc.to_music21(text)
    theirs = [(n.pitch.midi if n.isNote else None, F(n.quarterLength).limit_denominator(1000))
              for n in score.recurse().notesAndRests if not n.duration.isGrace]
    ours = [(e.pitch, e.duration) for e in abc.events(text)]
    # music21 splits notes at barlines into ties; compare total length and the pitches
    assert sum(d for _, d in theirs) == sum(d for _, d in ours)
    assert [p for p, _ in theirs] == [p for p, _ in ours]


def test_to_music21_carries_accidentals_like_the_standard():
    score = abc.to_music21(tune("^c c|", "M:2/4\nL:1/4\nK:C"))
    assert [n.pitch.midi for n in score.recurse().notes] == [73, 73]


# --------------------------------------------------------------------------- validate
def test_validate_accepts_a_good_tune_and_reports_bars():
    report = abc.validate(corpus_tune("ryansMammoth/LanigansBallJig.abc"))
    assert report.ok and report.error is None and report.tune is not None
    assert report.bar_error_rate == 0.0


def test_validate_keeps_bar_errors_out_of_ok():
    report = abc.validate(tune("c2 B2 A2 G2 | F6 | C8 |]", "M:4/4\nL:1/8\nK:C"))
    assert report.ok and report.bars is not None
    assert report.bar_error_rate == pytest.approx(1 / 3)


@pytest.mark.parametrize("text, cause", [
    ("X:1\nL:1/8\nK:C\nc2 B2 A2 G2 |", "no M:"),
    (tune("|: c2 B2 A2 G2 | c8 |"), "never closed"),
    (tune("c2 B2 A2 (3GA |"), "tuplet"),
    (tune("c2 B2 A2 G>"), "broken rhythm"),
    (tune("c2 B2 |"), "no complete bar"),
    ("not abc at all", "no K:"),
])
def test_validate_rejects(text, cause):
    report = abc.validate(text)
    assert not report.ok and cause in str(report.error)
    assert 0.0 <= report.bar_error_rate <= 1.0


@pytest.mark.parametrize("units", [Fraction(1), Fraction(3), Fraction(1, 2), Fraction(3, 2), Fraction(1, 3), Fraction(7, 4)])
def test_length_suffix_is_what_the_parser_reads_back(units):
    """One home for writing ABC lengths (importing and the evaluation's n-gram writer call it)."""
    text = f"X:1\nM:none\nL:1/8\nK:C\nC{abc.length_suffix(units)}|\n"
    assert [e.duration for e in abc.events(text)] == [units / 2]  # L:1/8 is half a quarter


def test_barline_tokens_are_the_bar_lines_the_parser_reads():
    # one reading of bar lines: the lenient scanner the player and the metrics use finds, on
    # every music line of real tunes, exactly the bar tokens of the parser's own tokenizer
    lines = checked = 0
    for path in sorted(CORPUS.glob("*/*.abc"))[::7]:
        for text in abc.split_tunes(path.read_text(encoding="latin-1"))[:20]:
            for number, line in enumerate(text.split("\n"), 1):
                if re.match(r"^[A-Za-z+]:", line) or not line.strip():
                    continue
                try:
                    parsed = abc._tokenize_line(line, number)
                except ABCError:
                    continue
                lines += 1
                want = [(t.start, t.start + len(t.data.token), t.data.token) for t in parsed if t.kind == "bar"]
                assert abc.barline_tokens(line) == want, line
                checked += len(want)
    assert lines > 1000 and checked > 3000
    assert abc.barline_tokens('"|:" !x|! [K:D] A|2 B:|: c|] % d |') == [(17, 18, "|"), (21, 24, ":|:"), (26, 28, "|]")]


# Aird's "Quick Step. Fencibles": P: lines in the body, [1 and [2 endings, a line continued with
# "\" before the [2, spaced bars, |: and :| repeats: every kind of bar edge the corpus writes.
FENCIBLES = ("airdsAirs/book1.abc", 170)


def test_bar_music_start_skips_what_belongs_to_the_bar_lines():
    # one reading of a bar's opening edge: a held chord symbol is written there (instructions)
    # and a bar's contents start there (editing.bar_spans, with lines=False)
    text = corpus_tune(*FENCIBLES)
    _, spans = abc.bar_segments(text)
    music = [text[abc.bar_music_start(text, a, b):b] for a, b in spans]
    assert [music[i] for i in (0, 3, 7, 8, 9)] == [
        "G2  B>G|", "c4     |", "G2 G,2:|", "G2    ||", "D/(E//F//G//A//B//^c//)|:"]
    plain = [text[abc.bar_music_start(text, a, b, lines=False):b] for a, b in spans]
    assert [i for i, (m, p) in enumerate(zip(music, plain)) if m != p] == [0, 8, 9]
    assert plain[0].startswith("P:A\n") and plain[8].startswith("\\\n") and plain[9].startswith("P:B\n")
    assert abc.bar_music_start("A4 :|2 B4|]", 5, 11) == 7  # the ending number a cut after :| leaves
    # on real tunes every bar's music starts with music: a note, rest, chord, decoration, slur...
    starts = set()
    for index in range(0, 200, 5):
        text = corpus_tune("airdsAirs/book1.abc", index)
        for a, b in abc.bar_segments(text)[1]:
            at = abc.bar_music_start(text, a, b)
            starts.add(text[at] if at < b else "")
    assert starts and starts <= set("ABCDEFGabcdefg^_=zxZ\"[({!.~HLMOPSTuvJRy"), starts


def test_trailing_barlines_start_finds_the_bar_lines_a_text_ends_with():
    # one reading of a bar's closing edge: a bar's contents end there (editing.bar_spans) and a
    # phrase is closed there (instructions.close_phrase writes |] or :| instead)
    text = corpus_tune(*FENCIBLES)
    _, spans = abc.bar_segments(text)
    kept = [text[a:abc.trailing_barlines_start(text, a, b)] for a, b in spans]
    assert [kept[i] for i in (1, 7, 8, 9)] == [
        "A2 FD ", "[1 G2 G,2", "\\\n                      [2 G2    ", "\nP:B\nD/(E//F//G//A//B//^c//)"]
    whole = text.rstrip()
    assert whole[:abc.trailing_barlines_start(whole)].endswith("GEA,G|F4")
    assert abc.trailing_barlines_start("F4 :| |]") == 3  # several, spaces between: all of them
    assert abc.trailing_barlines_start("G2 G,2") == 6  # none: the end


def test_a_text_field_holding_a_field_name_is_not_a_one_line_header():
    # ABC 2.1: a text field (T:, N:, ...) runs to the end of its line; only the one-line form
    # that starts with a field of values (X:1 L:1/8 M:4/4 K:...) is split. A model wrote this
    # title under the request grammar, and validation then read "K: Lee." as the key.
    text = "X:1\nT:Gr. K: Lee.\nN: I: first part\nM:12/8\nL:1/8\nK:D#m\nAGF EDC FDC A,3 |]\n"
    tune = abc.parse_tune(text)
    assert ("T", "Gr. K: Lee.") in tune.fields and ("N", "I: first part") in tune.fields
    assert tune.key == "D#m" and abc.validate(text).ok
    assert abc.parse_tune("X:1 L:1/8 M:4/4 K:Emin |: E2 EF GABc | d8 :|").meter == "4/4"
