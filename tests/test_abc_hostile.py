"""Hostile ABC: inputs that used to hang or crash the parser, the player's tempo reading, the
corpus build and answer extraction. Each case is bounded by a generous alarm (seconds) that the
old code blew through by minutes; the assertions are on what comes back."""
from __future__ import annotations

import signal
from contextlib import contextmanager
from fractions import Fraction

import pytest

from imelodist_lib import abc, corpus, evaluation, inference, player
from imelodist_lib.abc import ABCError

F = Fraction
HEADER = "X:1\nT:t\nM:4/4\nL:1/8\n"


@contextmanager
def finishes_within(seconds: float):
    """Fail (instead of hanging the suite) when the block runs longer than `seconds`."""
    def expire(_signum, _frame):
        raise TimeoutError(f"took over {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------- tempo
def test_parse_tempo_reads_every_form():
    assert abc.parse_tempo("1/4=120") == 120
    assert abc.parse_tempo("3/8=80") == 120
    assert abc.parse_tempo("1/4 3/8=40") == 100  # the beat is the sum
    assert abc.parse_tempo('"Allegro" 1/2=60') == 120
    assert abc.parse_tempo("1/4 = 100 \"slow\"") == 100
    assert abc.parse_tempo("1/4=90.5") == F(181, 2)
    assert abc.parse_tempo("120", F(1, 8)) == 60  # legacy: unit notes a minute
    assert abc.parse_tempo("C=120", F(1, 4)) == 120
    assert abc.parse_tempo("fast") is None and abc.parse_tempo("") is None


def test_tempo_with_a_long_digit_run_is_linear():
    # failed before: `((?:\d+/\d+\s*)+)=` backtracked exponentially (0.8 s at 18 segments, x4
    # per two more), so this 40-segment Q: line hung Tune.tempo, the player and the corpus build
    value = "1/" + "120/" * 40
    text = HEADER + f"Q:{value}\nK:G\nGABc|\n"
    with finishes_within(2):
        assert abc.parse_tune(text).tempo is None
        assert player.tempo_qpm(text) is None
        assert corpus.quarter_bpm(value) is None
        assert abc.parse_tempo("1/4" + " 1/4" * 20_000 + "x") is None


@pytest.mark.parametrize("value", ["¹²⁰", "1/4=¹²⁰", "1/4=" + "9" * 5000, "9" * 5000, "٣/٤=١٢٠"])
def test_unreadable_tempo_is_none_not_a_crash(value):
    # failed before: int("¹²⁰") and int() of 5,000 digits raised ValueError out of Tune.tempo
    text = HEADER + f"Q:{value}\nK:G\nGABc|\n"
    assert abc.parse_tune(text).tempo is None
    assert player.tempo_qpm(text) is None
    assert corpus.quarter_bpm(value) is None


# --------------------------------------------------------------------------- size and time
def test_broken_rhythm_pairs_are_linear():
    # failed before: `ev in v.bar_events` compared whole lists, so one long bar of "A>B" pairs
    # was quadratic (4,000 pairs: 16 s; 8,000 pairs about a minute)
    text = HEADER + "K:G\n" + "A>B" * 8000 + "\n"
    with finishes_within(8):
        report = abc.check_bars(text)
    assert len(report.bars) == 1 and report.bars[0].duration == 8000 * 2 * F(1, 2)


def test_many_voice_switches_after_many_bars_are_linear():
    # failed before: every line that closed no bar searched all earlier bars for its voice
    # (16,000 bars x 8,000 such lines)
    text = HEADER + "K:G\n" + "V:1\n" + "z8|" * 16000 + "\nV:2\n" + "[V:2]\n" * 8000 + "GABc|\n"
    assert len(text) <= abc.MAX_TUNE_CHARS
    with finishes_within(8):
        assert abc.validate(text).ok


def test_many_continuation_fields_are_linear():
    # +: lines are joined once at the end of the header (they were copied line by line)
    text = "X:1\nT:start\n" + "+:more words\n" * 7000 + "M:4/4\nL:1/8\nK:G\nGABc|\n"
    with finishes_within(4):
        tune = abc.parse_tune(text)
    assert tune.title.startswith("start more words more") and len(tune.title) == 5 + 7000 * 11


@pytest.mark.parametrize("entry", [abc.parse_tune, abc.validate, abc.check_bars, abc.normalize,
                                   abc.events, lambda t: abc.transpose(t, 2)])
def test_text_over_the_size_cap_is_an_abc_error(entry):
    text = HEADER + "K:G\n" + ("ABcd efga|" * 8 + "\n") * (abc.MAX_TUNE_CHARS // 80 + 1)
    assert len(text) > abc.MAX_TUNE_CHARS
    with finishes_within(2):
        if entry is abc.validate:
            report = abc.validate(text)
            assert not report.ok and "MAX_TUNE_CHARS" in str(report.error)
        else:
            with pytest.raises(ABCError, match="MAX_TUNE_CHARS"):
                entry(text)


def test_a_tune_at_the_size_cap_still_parses():
    text = HEADER + "K:G\n" + ("ABcd efga|" * 8 + "\n") * ((abc.MAX_TUNE_CHARS - 40) // 81)
    assert len(text) <= abc.MAX_TUNE_CHARS
    assert abc.validate(text).ok
