"""Hostile ABC: inputs that used to hang or crash the parser, the player's tempo reading, the
corpus build and answer extraction. Each case is bounded by a generous alarm (seconds) that the
old code blew through by minutes; the assertions are on what comes back."""
from __future__ import annotations

import signal
from contextlib import contextmanager
from fractions import Fraction

import pytest

from imelodist_lib import abc, corpus, evaluation, inference, labels, player
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
        assert labels.quarter_bpm(value) is None
        assert abc.parse_tempo("1/4" + " 1/4" * 20_000 + "x") is None


@pytest.mark.parametrize("value", ["¹²⁰", "1/4=¹²⁰", "1/4=" + "9" * 5000, "9" * 5000, "٣/٤=١٢٠"])
def test_unreadable_tempo_is_none_not_a_crash(value):
    # failed before: int("¹²⁰") and int() of 5,000 digits raised ValueError out of Tune.tempo
    text = HEADER + f"Q:{value}\nK:G\nGABc|\n"
    assert abc.parse_tune(text).tempo is None
    assert player.tempo_qpm(text) is None
    assert labels.quarter_bpm(value) is None


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


# --------------------------------------------------------------------------- corpus cleaning
REEL = ("X:1\nT:Reel\nM:4/4\nL:1/8\nQ:{q}\nK:D\n"
        "|:d2fd adfd|d2fd e2dc|B2gB bBgB|ABce d4:|\n|:f2af d2fd|g2bg e2ge|fgaf gfed|ABce d4:|\n")


def test_one_bad_tempo_does_not_stop_the_corpus_build(tmp_path):
    # failed before: the Q:\u00b9\u00b2\u2070 tune raised ValueError out of corpus.clean (via
    # Tune.tempo), aborting the whole build without naming the tune
    from imelodist_lib.profiles import get_profile

    profile = get_profile("cpu", workdir=tmp_path)
    records = [corpus.TuneRecord(id=f"t/{i}", abc=REEL.format(q=q).replace("|:d2fd", "|:" + first),
                                 source="t")
               for i, (q, first) in enumerate([("1/4=120", "d2fd"), ("¹²⁰", "e2fd"),
                                               ("⁹⁶", "f2fd")])]
    kept, report = corpus.clean(records, profile)
    assert report.is_balanced() and report.n_in == 3
    assert [r.id for r in kept] == ["t/0", "t/1", "t/2"]  # unreadable Q: is no tempo, not a crash
    assert [labels.quarter_bpm(r.tempo) for r in kept] == [120, None, None]


def test_clean_counts_a_crashing_record_and_names_it(tmp_path):
    from imelodist_lib.profiles import get_profile

    profile = get_profile("cpu", workdir=tmp_path)
    good = corpus.TuneRecord(id="t/good", abc=REEL.format(q="1/4=120"), source="t")
    # a loader bug: bytes where text belongs; the analysis raises TypeError, not ABCError
    broken = corpus.TuneRecord(id="t/bytes", abc=REEL.format(q="1/4=96").encode(), source="t")
    with pytest.warns(UserWarning, match="t/bytes"):
        kept, report = corpus.clean([good, broken], profile)
    assert [r.id for r in kept] == ["t/good"]
    assert report.dropped == {"analysis failed: TypeError": 1}
    assert report.examples["analysis failed: TypeError"] == "t/bytes"


def test_clean_applies_the_length_cap_before_parsing(tmp_path):
    from imelodist_lib.profiles import get_profile

    profile = get_profile("cpu", workdir=tmp_path)
    huge = corpus.TuneRecord(id="t/huge", abc=REEL.format(q="1/4=120") + "A>B" * 300_000,
                             source="t")
    with finishes_within(2):
        kept, report = corpus.clean([huge], profile)
    assert kept == [] and report.dropped == {"too_long": 1}


# --------------------------------------------------------------------------- answers and streams
GOOD = "X:1\nT:Ok\nM:4/4\nL:1/8\nK:G\nGABc dedB|c2e2 d4|]\n"


@pytest.mark.parametrize("hostile", [
    "```" + " " * 200_000,  # failed before: 20,000 spaces took 2.2 s, quadratic
    "X:1\nM:4/4\nK:G\n" + "[A:" * 60_000,  # failed before: quadratic in _looks_like_music
    "`" * 200_000 + "\n" + GOOD,
])
def test_extract_abc_is_linear_on_hostile_answers(hostile):
    with finishes_within(3):
        found = inference.extract_abc(hostile)
    assert found == [] or found == [abc.normalize(GOOD)]


def test_extract_abc_still_reads_fences_and_caps_its_input():
    assert inference.extract_abc("Here:\n```abc \t\n" + GOOD + "```\nEnjoy") == [abc.normalize(GOOD)]
    assert inference.extract_abc("```\n" + GOOD) == [abc.normalize(GOOD)]  # unclosed fence
    with pytest.raises(ABCError, match="MAX_ANSWER_CHARS"):
        inference.extract_abc(GOOD + " " * inference.MAX_ANSWER_CHARS)


def test_first_bar_seconds_reads_each_piece_once():
    # failed before: every piece re-joined and re-searched the whole text (quadratic), and
    # `[A-Ga-gz][^|]*\|` rescanned a bar-less body from every note
    pieces = ["X:1\nM:4/4\n", "K:G\n"] + ["A"] * 200_000 + ["|", "B"]
    with finishes_within(3):
        seconds, text = inference.first_bar_seconds(iter(pieces))
    assert seconds is not None and text == "".join(pieces)
    assert inference.first_bar_seconds(iter(["K:G\nABc|"]))[0] is None  # no line before K:
    assert inference.first_bar_seconds(iter(["X:1\nK:G", "\n|", "A", "B|"]))[0] is not None


def test_parse_answer_raises_only_abc_error_on_hostile_text():
    for text in ["Q:" + "1/" + "120/" * 40, GOOD + "z" * abc.MAX_TUNE_CHARS,
                 "\x00\ud800\u2028\u202e" * 1000]:
        with finishes_within(4), pytest.raises(ABCError):
            evaluation.parse_answer(text)
    with finishes_within(8):  # one long last bar of broken rhythms: valid, and linear
        assert evaluation.parse_answer(GOOD + "A>B" * 8000).bar_errors == 1
    assert evaluation.parse_answer(GOOD.replace("K:G", "Q:1/4=¹²⁰\nK:G")).tempo is None
