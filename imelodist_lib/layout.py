"""The house layout of ABC answers: a fixed number of bars a line (issue 13, length).

The corpus writes its tunes as their sources did: Essen songs a phrase a line, O'Neill's four or
eight bars, some lines broken inside a bar. A small model asked for 24 bars must then count up to
24 barlines with nothing to count by. Written `bars_per_line` bars a line, as guaranteed-valid
decoding already writes them (`grammar.request_grammar`), a length is whole lines plus a few
bars. Line breaks in ABC only break beams and systems, so a relaid tune is the same music; each
relayout is checked by comparing the tune's events and bars before and after, and a tune that
does not survive unchanged (extra body lines such as `P:` or `W:`, several voices, bars that end
with their line) keeps its own layout.

Laying out alone did not teach length (TRAINING_LOG, "Tried after 2h"): the model still has to
count. `with_bar_counts` gives it a count to copy instead: every line ends with the ABC comment
`% n/total`, bars written so far of the bars asked, so the next line's figure is this one's plus
a line's bars and the total is copied from the line above. Renderers and the validator skip
comments; `without_bar_counts` removes them.
"""
from __future__ import annotations

import bisect
import re
from typing import Any

from imelodist_lib import abc
from imelodist_lib.instructions import _seed_bars, count_bars, with_turns

__all__ = ["lay_out", "laid_out_chat", "with_bar_counts", "without_bar_counts", "counted_chat"]

_FIELD_LINE = re.compile(r"^\s*(%|[A-Za-z+]:)", re.M)  # a header field, lyrics or comment line
_CONTINUATION = re.compile(r"\\[ \t]*(\n|$)")  # ABC's line continuation: `\` ending a line


def _music(text: str) -> tuple | None:
    """What a relayout must keep: every event's pitch(es), duration, bar, tie, kind and voice,
    each bar's kind and index, and how many bars have the wrong length; None when the text does
    not parse."""
    try:
        tune = abc.parse_tune(text)
        report = abc.check_bars(tune)
    except (abc.ABCError, ValueError):
        return None
    notes = tuple((e.pitches, e.duration, e.bar, e.tie, e.kind, e.voice) for e in abc.events(tune))
    bars = tuple((b.kind, b.index) for b in report.bars)
    return notes, bars, len(report.errors)


def _one_line(segment: str) -> str:
    """A stretch of the body on one line: continuation backslashes and line breaks become spaces."""
    return " ".join(_CONTINUATION.sub(" ", segment).split())


def lay_out(text: str, bars_per_line: int = 4) -> str:
    """`text` with its body rewritten `bars_per_line` bars a line, or `text` itself where that
    would not give the same music (see the module docstring). Pickups, at the start or after a
    section's end, are not counted: they join the line of the bars they lead into."""
    if bars_per_line < 1:
        raise ValueError(f"bars_per_line must be >= 1, got {bars_per_line}")
    try:
        body_start, spans = abc.bar_segments(text)
    except (abc.ABCError, ValueError):
        return text
    before = _music(text)
    if before is None or not spans or _FIELD_LINE.search(text[body_start:]):
        return text
    unclosed = [i for i, (a, b) in enumerate(spans) if not text[a:b].rstrip().endswith(("|", ":", "]"))]
    if any(i < len(spans) - 1 or "\n" in text[spans[i][0]:spans[i][1]].strip() for i in unclosed):
        return text  # bars that end with their line (Essen style): joining lines would join bars
    pieces = [_one_line(text[a:b]) for a, b in spans]
    tail = _one_line(text[spans[-1][1]:])
    if tail:
        pieces[-1] += tail
    kinds = [kind for kind, _ in before[1]]
    lines, line, counted = [], [], 0
    for i, piece in enumerate(pieces):
        line.append(piece)
        counted += (kinds[i] if i < len(kinds) else "full") != "pickup"
        if counted == bars_per_line:
            lines.append(" ".join(line))
            line, counted = [], 0
    if line:
        lines.append(" ".join(line))
    laid = text[:body_start] + "\n".join(lines) + "\n"
    return laid if _music(laid) == before else text


def laid_out_chat(chat: dict[str, Any], bars_per_line: int = 4) -> dict[str, Any]:
    """A composing chat record (`instructions.chat_record`) with its answer laid out, and for a
    continuation the given bars in the prompt laid out the same way (still the answer's opening).
    Other records (knowledge, identity) come back unchanged."""
    request = chat.get("request")
    if not request:
        return chat
    _, user, answer = (m["content"] for m in chat["messages"])
    laid = lay_out(answer, bars_per_line)
    if laid == answer:
        return chat
    request = dict(request)
    seed = request.get("seed_abc")
    if request.get("task") == "continue" and seed:
        new_seed = _seed_bars(laid, count_bars(seed))
        if seed.strip() not in user:
            return chat  # a prompt that does not quote the opening as built: keep the pair as it is
        user = user.replace(seed.strip(), new_seed.strip())
        request["seed_abc"] = new_seed
    return with_turns(chat, user, laid, request=request)


# bar counts: a running count the answer writes for itself (issue 13, length)
_COUNT = re.compile(r"[ \t]*%[ \t]*\d+/\d+[ \t]*$", re.M)


def with_bar_counts(text: str, total: int | None = None) -> str:
    """`text` with a comment ` % n/total` ending each body line that closes a bar: n bars written
    so far (`instructions.count_bars`' bars, pickups included), `total` the bars asked for
    (default: the tune's own count). A small model cannot count 24 barlines back; it can copy
    the total from the line above and add a line's bars to the count. ABC comments are not music,
    so the tune is unchanged (checked as `lay_out` checks, else `text` comes back); lines ending
    with a continuation `\\` get no comment."""
    try:
        body_start, spans = abc.bar_segments(text)
    except (abc.ABCError, ValueError):
        return text
    before = _music(text)
    if before is None or not spans:
        return text
    total = len(spans) if total is None else total
    ends = sorted(end for _, end in spans)
    out, offset, done = [], 0, 0
    for line in text.split("\n"):
        line_end = offset + len(line)
        closed = bisect.bisect_right(ends, line_end + 1)
        code = line.rstrip()
        if offset >= body_start and closed > done and code and not code.endswith("\\") \
                and not _FIELD_LINE.match(line) and "%" not in line:
            line = f"{code} % {closed}/{total}"
        done = max(done, closed)
        out.append(line)
        offset = line_end + 1
    counted = "\n".join(out)
    return counted if _music(counted) == before else text


def without_bar_counts(text: str) -> str:
    """`text` with the ` % n/total` comments of `with_bar_counts` removed (nothing else)."""
    return _COUNT.sub("", text)


def counted_chat(chat: dict[str, Any], bars_per_line: int = 4) -> dict[str, Any]:
    """A composing chat laid out (`laid_out_chat`) and, when its request states a length, its
    answer written `with_bar_counts` toward that length. Other records come back laid out only."""
    chat = laid_out_chat(chat, bars_per_line) if bars_per_line else chat
    request = chat.get("request") or {}
    if not request.get("bars") or request.get("chords"):
        return chat
    _, user, answer = (m["content"] for m in chat["messages"])
    return with_turns(chat, user, with_bar_counts(answer, int(request["bars"])))
