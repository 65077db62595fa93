"""ABC 2.1 constructs from the standard (https://abcnotation.com/wiki/abc:standard:v2.1), and
abc2midi's second opinion on the bar checker.

The tunes are written here after the standard's own examples: 3.1.6 (M:), 3.1.14 and 4.6
(K:/V: clefs and transposition), 4.2-4.3 (accidentals, microtones), 7.4 (voice overlay),
8.2 (text blocks).
"""
from __future__ import annotations

import shutil
import subprocess
from fractions import Fraction as F
from pathlib import Path

import pytest

from imelodist_lib import abc
from imelodist_lib.abc import ABCError

CORPUS = Path(__import__("music21").__file__).resolve().parent / "corpus"


def tune(body: str, header: str = "M:4/4\nL:1/4\nK:C") -> str:
    return f"X:1\nT:standard\n{header}\n{body}\n"


def pitches(text: str) -> list[int | None]:
    return [e.pitch for e in abc.events(text)]


# --------------------------------------------------------------------------- 4.6 clefs
@pytest.mark.parametrize("key", ["C treble-8", "Am alto4", "G alto3 clef=bass3",
                                 "D bass4 middle=d", "F tenor-8 transpose=-2",
                                 "E tenor3 stafflines=5", "Bb clef=treble+8 baritone-8"])
def test_clef_and_transposition_words_are_read_and_keep_written_pitch(key):
    text = tune("C D E F|", f"M:4/4\nL:1/4\nK:{key}")
    assert str(abc.parse_key(key)) == key.split()[0]
    base = pitches(tune("C D E F|", f"M:4/4\nL:1/4\nK:{key.split()[0]}"))
    assert pitches(text) == base  # clef, middle=, transpose=, +8/-8: printing and playback only


def test_bare_clef_name_after_the_key_and_clef_only_key():
    assert abc.parse_key("D bass").accidentals["F"] == 1  # still D major's F sharp
    assert abc.parse_key("alto4").tonic == "C"  # a clef alone: no signature


@pytest.mark.parametrize("key, cause", [("G clef=violin", "bad clef"),
                                        ("G middle=high", "bad middle"),
                                        ("G transpose=up", "bad transpose"),
                                        ("G octave=x", "bad octave")])
def test_bad_clef_and_transposition_values_name_the_word(key, cause):
    with pytest.raises(ABCError, match=cause):
        abc.parse_key(key)


def test_octave_moves_the_notes_in_key_and_voice_fields():
    # 4.6: "octave=-1 means that C is read as C," (to save writing commas)
    assert pitches(tune("C c|", "M:2/4\nL:1/4\nK:C octave=-1")) == [48, 60]
    body = "V:1\nC D|\nV:2 octave=1\nC D|\n[V:1] E F|"
    assert pitches(tune(body, "M:2/4\nL:1/4\nV:1 clef=treble\nV:2 clef=bass\nK:C")) == [
        60, 62, 72, 74, 64, 65]
    assert abc.octave_shift("Am clef=bass octave=-2") == -2
    with pytest.raises(ABCError, match="bad clef"):
        abc.events(tune("V:1 clef=viola\nC D|", "M:2/4\nL:1/4\nK:C"))


# --------------------------------------------------------------------------- 3.1.14 K: exp
def test_explicit_and_modified_key_signatures_with_a_clef():
    key = abc.parse_key("D exp _b _e ^f clef=bass")  # 3.1.14: only the listed accidentals
    assert {k: v for k, v in key.accidentals.items() if v} == {"B": -1, "E": -1, "F": 1}
    assert abc.parse_key("D Phr ^f treble-8").accidentals["F"] == 1
    assert pitches(tune("B E F c|", "M:4/4\nL:1/4\nK:G exp ^f alto4")) == [71, 64, 66, 72]


# --------------------------------------------------------------------------- microtones
def test_microtonal_accidentals_round_to_the_nearest_semitone():
    # ^/ a quarter tone up, _/ down; ^3/4 three quarter tones: rounded, half away from natural
    assert pitches(tune("^/c _/e ^3/4c _1/3B|")) == [73, 75, 73, 71]
    assert pitches(tune("^/c c =c c|")) == [73, 73, 72, 72]  # carried through the bar
    with pytest.raises(ABCError, match="microtonal"):
        abc.transpose(tune("^/c d e f|"), 2)


# --------------------------------------------------------------------------- 8.2 text
def test_text_blocks_are_text_not_music():
    text = tune("C D E F|\n%%begintext\nThis song: sung | in & rounds [x]\n%%endtext\nG A B c|]")
    assert len(abc.events(text)) == 8
    assert "This song" not in abc.normalize(text)
    header = "X:1\n%%begintext\nT:not a title\n%%endtext\nT:Real\nM:4/4\nL:1/4\nK:C\nCDEF|\n"
    assert abc.parse_tune(header).title == "Real"


# --------------------------------------------------------------------------- 3.1.6 meters
def test_complex_meters_make_a_five_eight_bar_and_alternating_meters_take_either():
    assert abc.meter_choices("(2+3)/8") == abc.meter_choices("2+3/8") == (F(5, 2),)
    assert abc.meter_choices("2/4 3/4") == (F(2), F(3))
    report = abc.check_bars(tune("A B|c d e|A B c d|c d|", "M:2/4 3/4\nL:1/4\nK:C"))
    assert [b.expected for b in report.bars] == [2, 3, 2, 2]
    assert [e.bar for e in report.errors] == [2]  # 4 beats fit neither 2/4 nor 3/4


# --------------------------------------------------------------------------- 7.4 overlay
def test_voice_overlay_checks_every_layer():
    good = tune("A2 B2 & c2 d2|A B c d & c4|]")
    assert abc.check_bars(good).errors == []
    assert [e.voice for e in abc.events(good)][:4] == ["", "", "&1", "&1"]
    bad = abc.check_bars(tune("A B c d|A4 & B2|]"))
    assert len(bad.errors) == 1 and "overlay" in bad.errors[0].message
    with pytest.raises(ABCError, match="unsupported"):
        abc.parse_tune(tune("A B (&c d|e f&) g a|"))


# --------------------------------------------------------------------------- normaliser
def test_normalize_writes_the_bar_line_a_full_bar_line_end_means():
    # Essen: "d4d4" ends the line after a full bar, with no bar line; an accidental before it
    # carries over the line end (ABC 2.1 joins the lines), so the normaliser writes it too
    text = tune("G2 | _B2B2c2c2 | d2_B2B4\nB2B2B2B2 | c8 |]", "M:4/2\nL:1/4\nK:G")
    out = abc.normalize(text)
    assert "d2_B2B4 |\n_B2B2B2B2 |" in out  # once: the rest of the bar carries it
    assert pitches(out) == pitches(text)
    assert abc.normalize(out) == out


@pytest.mark.skipif(shutil.which("abc2midi") is None,
                    reason="abc2midi is not installed (Debian package abcmidi: "
                           ".ci/system-deps.sh installs it)")
def test_abc2midi_agrees_on_normalised_tunes():
    from benchmarks.bench_abc2midi import abc2midi_flags, run_abc2midi

    essen = abc.split_tunes((CORPUS / "essenFolksong/altdeu10.abc").read_text("latin-1"))[0]
    reel = abc.split_tunes((CORPUS / "ryansMammoth/AcaciaReel.abc").read_text("latin-1"))[0]
    wrong = tune("A B c d|A B c|A B c d|A B c d e|]")
    # the second fixed class: a last ending completed by the next part's pickup (ours was strict)
    aird = tune("A>FD>F AdcB|BdAF D/D/D [1 D2:|[2 D||\nf/g/|afdf abaf|geaf d4|]",
                "M:C\nL:1/8\nK:D")
    assert not abc2midi_flags(run_abc2midi(abc.normalize(aird))) and not abc.check_bars(aird).errors
    # the fixed class: abc2midi flagged the raw Essen tune (lines joined), not the normalised
    assert abc2midi_flags(run_abc2midi(essen)) and abc.check_bars(essen).errors == []
    for text in (essen, reel):
        assert not abc2midi_flags(run_abc2midi(abc.normalize(text)))
    assert abc2midi_flags(run_abc2midi(abc.normalize(wrong)))
    assert abc.check_bars(wrong).errors
    assert subprocess.run(["abc2midi", "-ver"], capture_output=True).returncode == 0


def test_a_last_ending_that_leads_into_the_next_parts_pickup_is_one_bar():
    # a class found against abc2midi (Aird's airs): "[2 D ||" then the pickup "f/g/|" of part B
    text = tune("A>FD>F AdcB|BdAF D/D/D [1 D2:|[2 D||\nf/g/|afdf abaf|geaf d4|]",
                "M:C\nL:1/8\nK:D")
    assert abc.check_bars(text).errors == []
    short = tune("A>FD>F AdcB|BdAF D/D/D [1 D2:|[2 D||\nf/|afdf abaf|geaf d4|]", "M:C\nL:1/8\nK:D")
    assert len(abc.check_bars(short).errors) == 1  # the pickup must make up the bar exactly
