"""Training chats shaped like the any-request suite (issue 13, section 3).

The ordinary and phrase chats ask for what the corpus holds: 94 % of its train tunes are major,
two thirds are in 2/4, 6/8, 4/4 or 3/4, and a request's length is stated in a third of them at
most. `request_suite.any_request_suite` draws key, meter and length evenly, so a model trained on
the corpus's shapes meets requests it has hardly seen (Bbm, 12/8, 24 bars). These chats are
drawn the suite's way from train tunes, with exact rewrites only:

- key: a mode drawn as the suite draws its keys (major, minor, modes), then a tune in that mode,
  moved to one of the suite's tonics for it (`instructions.transposed`); the request names the
  suite's spelling (Cb, Gb, C#), the answer writes the conventional one (B, F#, Db): the same key;
- meter: the tune's own, or one with the same bar length written otherwise: C <-> 4/4 and
  C| <-> 2/2 (the same bars), 3/4 -> 3/8 and 6/4 -> 6/8 (unit length halved: the same notes,
  bars half as long), 2/4 -> 4/4 and 6/8 -> 12/8 (pairs of bars joined where every barline
  between them is a plain `|`: no endings, sections of even length);
- length: one of the suite's lengths (4-32 bars) that the tune holds: the opening that many
  bars, closed with `|]` or `:|` (`instructions.close_phrase`), always stated in the request;
- task: emotion, chords, theme+chords and continuation in turn, zh and en, key and meter always
  named (chords: one per bar of the answer; continuations: its first 2 or 4 bars given).

A draw that a tune cannot serve (too short, a rewrite that does not validate) takes another tune
of its pool. Where a mode has no tune in a meter that rewrites to the drawn one, the chat keeps
its tune's own meter; where fewer than `min_pool` tunes are as long as drawn, the longest
opening a tune has is taken: the corpus decides those shares (few modal tunes, few past 24 bars).
"""
from __future__ import annotations

import dataclasses
import random
import re
from typing import Any, Sequence

from imelodist_lib import abc
from imelodist_lib.instructions import (COMPOSE_TASKS, LANGS, ComposeRequest, _normalized,
                                        _seed_bars, chat_record, chords_per_bar, close_phrase,
                                        count_bars, render_prompt, request_from_tune, target_for,
                                        transposed, with_turns)
from imelodist_lib.request_suite import SUITE_KEYS, SUITE_LENGTHS, SUITE_METERS, tonic_shift

__all__ = ["REQUEST_TASK", "COPY_TASK", "request_chats", "copy_chats", "random_bars",
           "meter_variants", "join_bar_pairs", "altered_notes", "altered_opening", "varied_continuations"]

REQUEST_TASK = "request"  # records' task tag: "request/<task>"
COPY_TASK = "copy"
_RELABEL = {"C": "4/4", "4/4": "C", "C|": "2/2", "2/2": "C|"}
_HALVE = {"3/4": "3/8", "6/4": "6/8"}
_JOIN = {"2/4": "4/4", "6/8": "12/8"}
_ENDING = re.compile(r"(\|\s*\[?|\[)[1-9]")  # |1 |[1 [1 :|2 ... : first/second endings
_HEADER_LINE = "^{field}:.*$"


def _mode_of(key: str | None) -> str:
    return abc.parse_key(key or "C").mode


def _set_field(text: str, field: str, value: str) -> str:
    """The tune with its header's `field:` line set to `value` (the first such line)."""
    pattern = re.compile(_HEADER_LINE.format(field=field), re.M)
    if not pattern.search(text):
        raise ValueError(f"tune has no {field}: line")
    return pattern.sub(f"{field}:{value}", text, count=1)


def join_bar_pairs(text: str) -> str:
    """The tune with every two bars joined into one (2/4 -> 4/4, 6/8 -> 12/8 once M: changes):
    the plain `|` closing each odd bar (counted from the first full bar, within each section) is
    removed. Raises ValueError for tunes this cannot do exactly: endings, more than one voice,
    a bar other than full (a pickup at the start excepted) or a section of odd length."""
    body_start, spans = abc.bar_segments(text)
    if _ENDING.search(text[body_start:]) or re.search(r"^V:", text, re.M):
        raise ValueError("endings or voices: bars cannot be paired")
    bars = abc.check_bars(abc.parse_tune(text)).bars
    kinds = [b.kind for b in bars][:len(spans)]
    first = 1 if kinds and kinds[0] == "pickup" else 0
    if any(k != "full" for k in kinds[first:]):
        raise ValueError("a bar that is not full: bars cannot be paired")
    cuts: list[tuple[int, int]] = []
    odd = True
    for i in range(first, len(spans)):
        start, end = spans[i]
        line_at = abc.trailing_barlines_start(text, start, end)
        barline = text[line_at:end].strip()
        if odd:
            if barline != "|":
                raise ValueError(f"bar {i + 1} ends a section after an odd number of bars")
            cuts.append((line_at, end))
        odd = not odd
    if not odd:
        raise ValueError("the tune ends after an odd number of bars")
    for at, end in reversed(cuts):
        text = text[:at] + text[at:end].replace("|", " ", 1) + text[end:]
    return text


def _rewrite(text: str, meter: str, wanted: str) -> str:
    """The tune (in `meter`) written exactly in `wanted`; raises ValueError when no rewrite
    gives it or the result does not validate with every bar full."""
    if wanted == meter:
        out = text
    elif _RELABEL.get(meter) == wanted:
        out = _set_field(text, "M", wanted)
    elif _HALVE.get(meter) == wanted:
        unit = abc.parse_tune(text).unit_length
        if not (unit and "L:" in text.split("K:", 1)[0]):
            raise ValueError("no L: line to halve")
        out = _set_field(_set_field(text, "L", f"1/{unit.denominator * 2}"), "M", wanted)
    elif _JOIN.get(meter) == wanted:
        out = _set_field(join_bar_pairs(text), "M", wanted)
    else:
        raise ValueError(f"no exact rewrite from {meter} to {wanted}")
    report = abc.validate(out)
    if not (report.ok and report.bar_error_rate == 0.0):
        raise ValueError(f"the tune written in {wanted} does not validate")
    return out


def meter_variants(text: str, meter: str | None) -> list[tuple[str, str]]:
    """(meter, text) pairs the tune can be written in exactly: its own meter first."""
    if not meter:
        return []
    out = []
    for wanted in (meter, _RELABEL.get(meter), _HALVE.get(meter), _JOIN.get(meter)):
        if wanted:
            try:
                out.append((wanted, _rewrite(text, meter, wanted)))
            except (ValueError, abc.ABCError):
                pass
    return out


def _sources(meter: str) -> set[str]:
    """The meters a tune can be in to be written exactly in `meter` (meter_variants' rewrites)."""
    out = {meter}
    for table in (_RELABEL, _HALVE, _JOIN):
        out |= {have for have, new in table.items() if new == meter}
    return out


def _one_chat(record: Any, task: str, lang: str, key: str, meter: str | None, bars: int,
              rng: random.Random) -> dict:
    """One chat for `record` moved to `key`, written in `meter` (None: its own), cut to at most
    `bars` bars (raises ValueError / ABCError when the tune cannot serve)."""
    have = abc.parse_tune(record.abc).key
    moved = transposed(record, tonic_shift(have, key), chorded=task in ("chords", "theme_chords"))
    # the full answer first (chords fitted per bar, T: for a theme), then rewrites and the cut
    base = request_from_tune(moved, task if task != "continue" else "emotion", lang, rng)
    tune = abc.parse_tune(_normalized(moved.abc))
    base = dataclasses.replace(base, key=tune.key, meter=tune.meter, bars=None, tempo=None)
    full = target_for(moved, base)
    meter = meter or tune.meter
    text = _rewrite(full, tune.meter, meter)
    first = abc.check_bars(abc.parse_tune(text)).bars[0].kind == "pickup"
    have_bars = count_bars(text) - first
    fits = [n for n in SUITE_LENGTHS if n <= min(bars, have_bars)]
    if not fits:
        raise ValueError("tune too short")
    take = fits[-1]
    answer = text if take == have_bars else close_phrase(_seed_bars(text, take + first))
    n_bars = count_bars(answer)
    request = dataclasses.replace(base, key=key, meter=meter, bars=n_bars)
    if task in ("chords", "theme_chords"):
        chords = chords_per_bar(answer)
        if not all(chords):
            raise ValueError("a bar without a chord symbol")
        request = dataclasses.replace(request, chords=[str(c) for c in chords], bars=None)
    elif task == "continue":
        given = 2 if n_bars < 8 else rng.choice((2, 4))
        if n_bars < given + first + 2:
            raise ValueError("too short to continue")
        request = ComposeRequest("continue", lang, key=key, meter=meter, bars=n_bars,
                                 seed_abc=_seed_bars(answer, given + first))
    return chat_record(request, render_prompt(request, rng=rng), answer, record.id,
                       f"{REQUEST_TASK}/{task}")


def request_chats(records: Sequence[Any], n: int, seed: int = 0, attempts: int = 30,
                  min_pool: int = 10, tasks: Sequence[str] = COMPOSE_TASKS) -> list[dict]:
    """`n` chats with task and language dealt in turn and key (mode first, then tonic), meter
    and length drawn evenly, each from a train tune that can serve it: one in the key's mode
    and a meter `meter_variants` rewrites to the drawn one (when the mode has none, a tune of
    the mode in its own meter) and, when at least `min_pool` such tunes have them, as many bars
    as drawn (else the longest opening it has). A draw no tune serves in `attempts` tries is
    left out. `tasks`: the task kinds dealt (default all composing kinds)."""
    unknown = set(tasks) - set(COMPOSE_TASKS)
    if unknown or not tasks:
        raise ValueError(f"tasks {sorted(unknown) or '(none)'}: choose from {list(COMPOSE_TASKS)}")
    rng = random.Random(seed)
    pools: dict[tuple[str, str], list[Any]] = {}
    for record in records:
        if getattr(record, "split", "train") == "train":
            key, meter = getattr(record, "key", None), getattr(record, "meter", None)
            if not meter:  # a record without header facts (corpus records carry them)
                tune = abc.parse_tune(record.abc)
                key, meter = tune.key, tune.meter
            pools.setdefault((_mode_of(key), str(meter)), []).append(record)
    modes = {mode for mode, _ in pools}
    keys = [k for k in SUITE_KEYS if _mode_of(k) in modes]
    if not keys:
        raise ValueError("no train tunes in any of the suite's modes")
    kinds = [(t, lang) for t in tasks for lang in LANGS]
    out: list[dict] = []
    for i in range(n):
        task, lang = kinds[i % len(kinds)]
        key, meter, bars = rng.choice(keys), rng.choice(SUITE_METERS), rng.choice(SUITE_LENGTHS)
        mode = _mode_of(key)
        pool = [r for m in sorted(_sources(meter)) for r in pools.get((mode, m), [])]
        if not pool:
            pool = [r for (md, _), rs in sorted(pools.items()) if md == mode for r in rs]
            meter = None
        long_enough = [r for r in pool if getattr(r, "n_bars", 0) >= bars]
        pool = long_enough if len(long_enough) >= min_pool else pool  # else: the longest it has
        for _ in range(attempts):
            try:
                out.append(_one_chat(rng.choice(pool), task, lang, key, meter, bars, rng))
                break
            except (ValueError, abc.ABCError):
                continue
    return out


# copy chats: a skill the continuations need and the model lacks (probes.copy_test: a second copy
# of random tokens is predicted no better than the first)
_COPY_PROMPTS = {
    "en": ("Copy these bars exactly, note for note:", "Write this melody out again without changing anything:",
           "Repeat the following ABC exactly:", "Please write out these bars once more, unchanged:"),
    "zh": ("请把下面的小节原样抄写一遍：", "请一字不改地把这段旋律再写一遍：", "照抄下面的 ABC 谱：",
           "请把这几小节重新写出来，不要改动："),
}
_EIGHTHS = {"2/4": 4, "3/4": 6, "4/4": 8, "6/8": 6, "9/8": 9, "12/8": 12, "3/8": 3, "2/2": 8, "C": 8, "C|": 8}
_NOTES = "CDEFGABcdefgab"


def random_bars(rng: random.Random, key: str, meter: str, bars: int, per_line: int = 4) -> str:
    """A tune of `bars` bars of random notes (L:1/8, scale notes of the key signature, lengths of
    one to four eighths filling each bar exactly), `per_line` bars a line, closed with `|]`: a
    melody no music prior predicts, so only copying it from the context writes it again."""
    if meter not in _EIGHTHS:
        raise ValueError(f"meter {meter!r}: choose one of {sorted(_EIGHTHS)}")
    written = []
    for _ in range(bars):
        left, bar = _EIGHTHS[meter], []
        while left:
            length = rng.randint(1, min(4, left))
            bar.append(rng.choice(_NOTES) + ("" if length == 1 else str(length)))
            left -= length
        written.append("".join(bar))
    lines = [" | ".join(written[i:i + per_line]) for i in range(0, bars, per_line)]
    return f"X:1\nM:{meter}\nL:1/8\nK:{key}\n" + " |\n".join(lines) + " |]\n"


def copy_chats(n: int, seed: int = 0, min_bars: int = 2, max_bars: int = 8) -> list[dict]:
    """`n` chats asking to copy a random-note tune (`random_bars`, the suite's keys and meters,
    `min_bars`..`max_bars` bars) answered by that tune, zh and en in turn."""
    rng = random.Random(f"{seed}/copy")
    out = []
    for i in range(n):
        lang = LANGS[i % len(LANGS)]
        tune = random_bars(rng, rng.choice(SUITE_KEYS), rng.choice(SUITE_METERS), rng.randint(min_bars, max_bars))
        out.append(chat_record(None, f"{rng.choice(_COPY_PROMPTS[lang])}\n{tune}", tune, None, COPY_TASK))
    return out


# continuations whose given bars no prior predicts: copying, asked the way continuations ask
_NOTE_OR_SKIP = re.compile(r'"[^"]*"|![^!]*!|\+[^+]*\+|\[[A-Za-z]:[^\]]*\]|%.*|([=^_]*)([A-Ga-g])')


def altered_notes(body: str, rng: random.Random, share: float = 0.5) -> str:
    """ABC body text with about `share` of its note letters changed to another letter of the same
    case (accidentals, octave marks and lengths kept, so every bar keeps its duration); chord
    symbols, decorations, inline fields and comments are left alone."""
    def swap(m: re.Match) -> str:
        if m.group(2) is None or rng.random() >= share:
            return m.group(0)
        letters = "ABCDEFG" if m.group(2).isupper() else "abcdefg"
        return m.group(1) + rng.choice([c for c in letters if c != m.group(2)])
    return _NOTE_OR_SKIP.sub(swap, body)


def altered_opening(chat: dict, rng: random.Random, share: float = 0.5) -> dict:
    """A continuation chat (`request_chats`, task continue) with notes of its given bars changed
    (`altered_notes`) in the prompt and in the answer's opening alike, so the answer still starts
    with exactly the given bars; raises ValueError when the chat is not such a continuation or
    the altered tune does not keep its bar lengths."""
    request = chat.get("request") or {}
    seed = request.get("seed_abc")
    _, user, answer = (m["content"] for m in chat["messages"])
    if request.get("task") != "continue" or not seed or not answer.startswith(seed.rstrip()) \
            or seed.strip() not in user:
        raise ValueError("not a continuation whose answer starts with its given bars")
    head = seed.rstrip()
    body_start = abc.bar_segments(head + "\n")[0]
    new_head = head[:body_start] + altered_notes(head[body_start:], rng, share)
    new_answer = new_head + answer[len(head):]
    before, after = (abc.check_bars(abc.parse_tune(t)) for t in (answer, new_answer))
    if [b.duration for b in before.bars] != [b.duration for b in after.bars]:
        raise ValueError("the altered notes changed a bar's length")
    new_seed = new_head + "\n"
    return with_turns(chat, user.replace(seed.strip(), new_seed.strip()), new_answer,
                      request={**request, "seed_abc": new_seed})


def varied_continuations(records: Sequence[Any], n: int, seed: int = 0, share: float = 0.5) -> list[dict]:
    """`n` continuation chats drawn like the suite's (`request_chats`, tasks=("continue",)), each
    with its given bars altered (`altered_opening`): a continuation can only start right by
    copying. Chats the alteration cannot serve are left out."""
    rng = random.Random(f"{seed}/varied")
    out = []
    for chat in request_chats(records, n, seed=seed, tasks=("continue",)):
        try:
            out.append(altered_opening(chat, rng, share))
        except (ValueError, abc.ABCError):
            continue
    return out
