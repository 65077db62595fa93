"""The house layout: N bars a line, the same music, or the tune as it was."""
from __future__ import annotations

import random

import pytest

from imelodist_lib import abc
from imelodist_lib.instructions import ComposeRequest, _seed_bars, chat_record, count_bars, render_prompt
from imelodist_lib.layout import (_music, counted_chat, laid_out_chat, lay_out, with_bar_counts,
                                   without_bar_counts)

# lines broken inside bars, a pickup, a repeat, a second part with its own pickup
REEL = ("X:1\nT:Reel\nM:C|\nL:1/8\nK:G\n"
        "AG|B2B2 B2AG|B2B2 B2g2|B2B2 B2AG|AGAB A2\nGA|B2B2 cBAG|A2B2 g2fg|a2gf g2fe|d2B2 B2::\n"
        "Bc|d2B2 g2B2|d2d2 d2e2|d2cB g2fg|a2A2 A2\nGA|B2B2 cBAG|A2B2 g2fg|a2gf g2fe|d2B2 B2:|\n")


def _body_lines(text: str) -> list[str]:
    return text[abc.bar_segments(text)[0]:].strip().split("\n")


def test_a_tune_is_laid_out_four_bars_a_line_with_the_same_music():
    laid = lay_out(REEL)
    assert laid != REEL and laid.startswith("X:1\nT:Reel\nM:C|\nL:1/8\nK:G\n")
    assert _music(laid) == _music(REEL) is not None
    lines = _body_lines(laid)
    # a pickup is not counted: it leads into the line of four full bars after it
    assert lines[0] == "AG| B2B2 B2AG| B2B2 B2g2| B2B2 B2AG| AGAB A2 GA|"
    assert lines[2].startswith("Bc| d2B2")
    assert lines[1] == "B2B2 cBAG| A2B2 g2fg| a2gf g2fe| d2B2 B2::"  # four bars, the last ends at ::
    assert [line.count("|") for line in lines] == [5, 3, 5, 4]
    assert count_bars(laid) == count_bars(REEL)
    assert lay_out(laid) == laid  # already laid out: unchanged
    two = _body_lines(lay_out(REEL, 2))
    assert len(two) == 8 and two[1] == "B2B2 B2AG| AGAB A2 GA|"


def test_continuation_backslashes_are_joined_not_left_inside_a_line():
    text = 'X:1\nM:3/4\nL:1/8\nK:D\n"D"d2 e2 f2 \\\n| "A"e4 d2 | "G"B2 A2 G2 \\\n| "D"F6 |]\n'
    laid = lay_out(text)
    assert "\\" not in laid and _body_lines(laid) == ['"D"d2 e2 f2 | "A"e4 d2 | "G"B2 A2 G2 | "D"F6 |]']
    assert _music(laid) == _music(text)


@pytest.mark.parametrize("text", [
    "X:1\nM:2/4\nL:1/8\nK:G\nP:A\nGA Bc|d2 B2|c2 A2|G4|\nP:B\nd2 d2|e2 c2|B2 A2|G4|]\n",  # part lines
    "X:1\nM:2/4\nL:1/8\nK:G\nGA Bc|d2 B2|\nw:la la la la la la\nc2 A2|G4|]\n",  # lyrics
    "X:1\nM:2/4\nL:1/8\nK:G\nGABc d2B2\nc2A2 G4\n",  # Essen style: a bar ends with its line
    "not ABC at all",
])
def test_what_would_not_stay_the_same_music_keeps_its_own_lines(text):
    assert lay_out(text) == text


def test_bars_per_line_must_be_positive():
    with pytest.raises(ValueError):
        lay_out(REEL, 0)


def test_a_continuation_chat_keeps_its_opening_in_the_prompt_and_the_answer():
    seed = _seed_bars(REEL, 3)
    request = ComposeRequest("continue", "en", seed_abc=seed, bars=count_bars(REEL))
    chat = chat_record(request, render_prompt(request, rng=random.Random(0)), REEL, "t1", "continue")
    laid = laid_out_chat(chat)
    user, answer = laid["messages"][1]["content"], laid["messages"][2]["content"]
    new_seed = laid["request"]["seed_abc"]
    assert answer == lay_out(REEL) and answer.startswith(new_seed.rstrip("\n"))
    assert new_seed.strip() in user and seed.strip() not in user
    assert count_bars(new_seed) == count_bars(seed) == 3
    assert chat["messages"][2]["content"] == REEL  # the record given is not changed
    knowledge = chat_record(None, "Who are you?", "I am IMelodist.", None)
    assert laid_out_chat(knowledge) is knowledge


def test_bar_counts_end_each_line_with_the_bars_so_far_and_keep_the_music():
    counted = with_bar_counts(lay_out(REEL), 18)
    lines = _body_lines(counted)
    # pickups are bars to count_bars (and to a request's length): 5 + 4 + 5 + 4 = 18
    assert [line.rsplit("% ", 1)[1] for line in lines] == ["5/18", "9/18", "14/18", "18/18"]
    assert count_bars(REEL) == 18 and _music(counted) == _music(REEL)
    assert without_bar_counts(counted) == lay_out(REEL)
    # the tune's own count by default; lines ending with a continuation get no comment
    text = 'X:1\nM:3/4\nL:1/8\nK:D\n"D"d2 e2 f2 \\\n| "A"e4 d2 | "G"B2 A2 G2 \\\n| "D"F6 |]\n'
    assert _body_lines(with_bar_counts(text)) == ['"D"d2 e2 f2 \\', '| "A"e4 d2 | "G"B2 A2 G2 \\',
                                                  '| "D"F6 |] % 4/4']
    assert with_bar_counts("not ABC at all") == "not ABC at all"


def test_only_chats_that_state_a_length_count_their_bars():
    def chat(**fields):
        request = ComposeRequest("emotion", "en", key="G", meter="C|", **fields)
        return chat_record(request, render_prompt(request, rng=random.Random(0)), REEL, "t1", "emotion")
    counted = counted_chat(chat(bars=18))["messages"][2]["content"]
    assert counted.rstrip().endswith("% 18/18") and counted.count("%") == 4
    assert counted_chat(chat())["messages"][2]["content"] == lay_out(REEL)  # no length asked
    chords = counted_chat(chat(chords=["G"] * 18, bars=18))["messages"][2]["content"]
    assert "%" not in chords  # a chord per bar states the length itself
    knowledge = chat_record(None, "Who are you?", "I am IMelodist.", None)
    assert counted_chat(knowledge) is knowledge


def test_bar_counts_are_not_heard_or_seen_as_music():
    from imelodist_lib import player

    counted = with_bar_counts(lay_out(REEL))
    assert player.to_midi(counted) == player.to_midi(lay_out(REEL))
    assert player.count_measures(player.render_svg(counted)) == 18
