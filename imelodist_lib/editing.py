"""Editing a user's own tune with the composer: regenerate chosen bars, harmonise a melody.

    [r] = regenerate(composer, tune, bars=range(4, 6), seed=0)   # new bars 5-6, the rest kept
    h = harmonise(composer, melody, seed=0)                       # same melody, a chord per bar

Both decode under a grammar built for the one request (`imelodist_lib.grammar`'s bar rules),
so the answer cannot break what is kept: in `regenerate` every byte outside the chosen bars is
the user's, each new bar lasts exactly as long as the bar it replaces (a pickup stays a pickup)
and keeps its chord symbol; in `harmonise` every note token is forced and only the chord
symbols are the model's choice.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from imelodist_lib import abc
from imelodist_lib.grammar import BarPlan, bar_fill_rules, ebnf_literal, plan_bars, reachable_rules
from imelodist_lib.instructions import ComposeRequest
from imelodist_lib.labels import diatonic_triads
from imelodist_lib.music import FLAT_NAMES, pitch_class

__all__ = ["BarSpan", "Regeneration", "Harmonisation", "bar_spans", "regenerate", "harmonise",
           "harmonise_grammar", "harmonise_budget", "strip_chords", "chord_vocabulary", "suffix_logprob"]

# chord roots as lead sheets spell them in sharp keys (Eb, Ab, Bb rather than D#, G#, A#)
_SHARP_ROOTS = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


@dataclass(frozen=True)
class BarSpan:
    """Where one bar's contents lie in a tune's text (bar lines and ending markers excluded)."""

    index: int
    start: int  # offset of the first character of the contents (a chord symbol, a note)
    end: int  # offset just after the last one
    duration: Fraction  # quarter lengths, as written
    kind: str  # abc.Bar.kind: full, pickup, section_end, ending, final
    chord: str | None  # the first chord symbol written in the bar


def bar_spans(abc_text: str) -> list[BarSpan]:
    """The contents of every bar of a one-voice tune, as offsets into `abc_text`."""
    tune = abc.parse_tune(abc_text)
    if len({ev.voice for ev in abc.events(tune)}) > 1:
        raise ValueError("the tune has several voices (V:): edit one voice at a time")
    bars = abc.check_bars(tune).bars
    _, segments = abc.bar_segments(abc_text)
    if len(segments) != len(bars):
        raise ValueError(f"could not place the tune's {len(bars)} bars in its text: write one bar "
                         f"line between bars (abc.normalize helps)")
    spans = []
    for bar, (a, b) in zip(bars, segments):
        start = abc.bar_music_start(abc_text, a, b, lines=False)
        closing = abc.trailing_barlines_start(abc_text, start, b)
        end = start + len(abc_text[start:closing].rstrip()) if closing < b else b
        chords = abc.QUOTED_CHORD_RE.findall(abc_text[start:end])
        spans.append(BarSpan(bar.index, start, end, bar.duration, bar.kind, chords[0] if chords else None))
    return spans


# --------------------------------------------------------------------------- regenerate
@dataclass
class Regeneration:
    """One answer of `regenerate`: the whole tune with the chosen bars written anew."""

    abc: str  # the tune: prefix + new bars + suffix, byte for byte outside the new bars
    bars: range
    new_bars: list[str]  # the new contents, one string per regenerated bar
    seed: int
    report: Any  # abc.ValidationReport of `abc`
    suffix_logprob: float | None = None  # log p(kept suffix | prompt, prefix, new bars), when ranked
    candidates: int = 1  # how many were sampled to choose this one


def _regeneration_grammar(text: str, spans: list[BarSpan], bars: range, plan: BarPlan) -> str:
    """root: the text before the range forced, then per new bar its chord (if any) and exactly its
    length of notes, the original bar lines and ending markers forced between them."""
    step = plan.unit_length * 4 / plan.steps_per_unit
    rules = [*bar_fill_rules(plan, chords_inside=False)]
    parts = [ebnf_literal(text[: spans[bars.start].start])]
    for k in bars:
        span = spans[k]
        steps = span.duration / step
        if steps.denominator != 1 or steps < 1:
            raise ValueError(f"bar {k} lasts {span.duration} quarter lengths, not a whole number of "
                             f"L/{plan.steps_per_unit} steps: it cannot be regenerated")
        if steps > plan.bar_steps:
            raise ValueError(f"bar {k} is longer than the meter's bar: fix it before regenerating")
        if span.chord:
            parts.append(ebnf_literal(f'"{span.chord}"'))
        parts.append(f"fill{int(steps)}")
        if k + 1 < bars.stop:
            parts.append(ebnf_literal(text[span.end: spans[k + 1].start]))
    rules.insert(0, "root ::= " + " ".join(parts))
    return "\n".join(reachable_rules(rules)) + "\n"


def regenerate(composer: Any, abc_text: str, bars: range, n: int = 1, seed: int | None = None,
               temperature: float | None = None, rank_by_suffix: bool = False, candidates: int = 4,
               max_new_tokens: int | None = None) -> list[Regeneration]:
    """n versions of the tune with bars `bars` (0-based, as `abc.check_bars` counts) written anew.

    Kept byte for byte: the header, every bar before and after the range, and the bar lines,
    repeat signs and first/second-ending markers between the new bars. Each new bar lasts as
    long as the bar it replaces (the meter's bar, or a pickup's or a section end's length) and
    starts with its chord symbol when it had one (its first one: later chords in the bar are
    not kept); a tie the model leaves at the end of the last new bar is dropped. The model is asked to continue the tune and
    its answer is forced to open with the prefix (header + bars before the range), so it writes
    the new bars having read the prefix. A left-to-right model never sees the suffix (the bars
    after the range): it is kept, not conditioned on. `rank_by_suffix=True` samples
    `candidates` versions and keeps the n under which the model finds the kept suffix most likely
    (`suffix_logprob`; transformers backend only) — the honest way to let the suffix choose.
    """
    if not isinstance(bars, range) or bars.step != 1 or len(bars) == 0:
        raise ValueError(f"bars must be a non-empty range of bar indices with step 1, e.g. range(4, 6); "
                         f"got {bars!r}")
    spans = bar_spans(abc_text)
    if bars.start < 0 or bars.stop > len(spans):
        raise ValueError(f"bars={bars!r} is outside the tune: it has {len(spans)} bars, "
                         f"indices 0..{len(spans) - 1}")
    if n < 1 or (rank_by_suffix and candidates < n):
        raise ValueError(f"need n >= 1 (and candidates >= n when ranking), got n={n}, candidates={candidates}")
    tune = abc.parse_tune(abc_text)
    if abc.meter_duration(tune.meter) is None:
        raise ValueError("the tune has no meter (M:): bars have no length to fill")
    plan = plan_bars(tune.meter, tune.unit_length)
    grammar = _regeneration_grammar(abc_text, spans, bars, plan)
    prefix = abc_text[: spans[bars.start].start]
    suffix = abc_text[spans[bars.stop - 1].end:]
    messages = composer.messages_for(ComposeRequest("continue", seed_abc=prefix.strip() or abc_text))
    if max_new_tokens is None:
        max_new_tokens = len(prefix) + len(bars) * (2 * plan.bar_steps + 12) + 32
    base = 0 if seed is None else int(seed)
    count = candidates if rank_by_suffix else n
    out = []
    for c in range(count):
        comp = composer.chat(messages, grammar=grammar, seed=base + c, temperature=temperature,
                             max_new_tokens=max_new_tokens)
        if comp.finish_reason != "stop" or not comp.text.startswith(prefix):
            raise RuntimeError(f"the answer did not complete the grammar (finish: {comp.finish_reason}); "
                               f"raise max_new_tokens (was {max_new_tokens})")
        # a tie closing the last new bar would tie into a kept note of any pitch: dropped
        new = comp.text[len(prefix):].removesuffix("-")
        text = prefix + new + suffix
        new_spans = bar_spans(text)
        contents = [text[s.start:s.end] for s in new_spans[bars.start:bars.stop]]
        score = suffix_logprob(composer, messages, prefix + new, suffix) if rank_by_suffix else None
        out.append(Regeneration(text, bars, contents, base + c, abc.validate(text), score, count))
    if rank_by_suffix:
        out.sort(key=lambda r: -r.suffix_logprob)
    return out[:n]


def suffix_logprob(composer: Any, messages: list[dict], answer: str, suffix: str) -> float:
    """log p(suffix | chat prompt, answer) under the composer's model, summed over the tokens
    that start inside the suffix (transformers backend: it needs the model's logits).

    messages: the chat as sent, system turn included (`composer.messages_for(...)`)."""
    import torch

    model = getattr(composer.engine, "model", None)
    tokenizer = getattr(composer.engine, "tokenizer", None)
    if model is None or tokenizer is None:
        raise ValueError("scoring the suffix needs the transformers backend (the model's logits); "
                         "use Composer(model_dir, backend='transformers') or rank_by_suffix=False")
    if not getattr(tokenizer, "chat_template", None):
        from imelodist_lib.models import CHAT_TEMPLATE

        tokenizer.chat_template = CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_dict=True)["input_ids"]
    enc = tokenizer(answer + suffix, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(prompt) + list(enc["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=model.device)).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    total = 0.0
    for i, (start, _) in enumerate(enc["offset_mapping"]):
        if start >= len(answer):
            pos = len(prompt) + i
            total += float(logp[pos - 1, ids[pos]])
    return total


# --------------------------------------------------------------------------- harmonise
@dataclass
class Harmonisation:
    """The melody as given with one chord symbol per bar chosen by the model."""

    abc: str
    chords: list[str]  # one per bar, in order
    seed: int
    report: Any  # abc.ValidationReport


def strip_chords(abc_text: str) -> str:
    """The tune without its chord symbols ("G", "Am7"; other quoted text stays)."""
    tune = abc.parse_tune(abc_text)
    lines = abc_text.split("\n")
    body_from = tune.first_body_line - 1
    body = abc.QUOTED_CHORD_RE.sub("", "\n".join(lines[body_from:]))
    return "\n".join(lines[:body_from] + [body])


def chord_vocabulary(key: str, region: bool = True) -> list[str]:
    """Chord symbols a harmonisation may choose from: with `region`, the key's major and minor
    triads (`labels.diatonic_triads`) and its dominant seventh; else all 24 major/minor triads
    and the 12 dominant sevenths (roots spelled with flats in flat keys)."""
    parsed = abc.parse_key(key)
    flats = parsed.fifths < 0
    roots = FLAT_NAMES if flats else _SHARP_ROOTS
    if region:
        tonic = pitch_class(parsed.tonic)
        triads = [c.name for c in diatonic_triads(key)]
        return list(dict.fromkeys(triads + [roots[(tonic + 7) % 12] + "7"]))
    return [r + q for q in ("", "m", "7") for r in roots]


def harmonise_grammar(abc_text: str, vocabulary: str = "key") -> str:
    """The grammar of a harmonisation: every byte of the melody (chord symbols removed) forced,
    one chord symbol from `chord_vocabulary` free at the start of every bar (vocabulary: "key"
    or "all"). `grammar.grammar_for_request` uses it for a "harmonise" request."""
    return _melody_grammar(strip_chords(abc_text), vocabulary)


def _melody_grammar(melody: str, vocabulary: str) -> str:
    """`harmonise_grammar` of a melody already without chord symbols (`strip_chords`)."""
    if vocabulary not in ("key", "all"):
        raise ValueError(f"vocabulary must be 'key' or 'all', got {vocabulary!r}")
    tune = abc.parse_tune(melody)
    errors = abc.check_bars(tune).errors
    if errors:
        raise ValueError(f"the melody has {len(errors)} bar(s) of the wrong length (first: {errors[0]}): "
                         f"fix them before harmonising, the notes are kept as they are")
    chords = chord_vocabulary(tune.key or "C", region=vocabulary == "key")
    rule = "chord ::= " + " | ".join(ebnf_literal(f'"{c}"') for c in chords)
    parts, cursor = [], 0
    for span in bar_spans(melody):
        parts += [ebnf_literal(melody[cursor:span.start]), "chord"]
        cursor = span.start
    parts.append(ebnf_literal(melody[cursor:]))
    return "root ::= " + " ".join(p for p in parts if p != '""') + "\n" + rule + "\n"


def harmonise_budget(abc_text: str) -> int:
    """max_new_tokens that always fits a harmonisation (characters of the melody, a chord's
    room per bar, a margin: a token is at least one character)."""
    return _melody_budget(strip_chords(abc_text))


def _melody_budget(melody: str) -> int:
    """`harmonise_budget` of a melody already without chord symbols (`strip_chords`)."""
    return len(melody) + 8 * len(bar_spans(melody)) + 32


def harmonise(composer: Any, abc_text: str, vocabulary: str = "key", lang: str = "zh",
              seed: int | None = None, temperature: float | None = None,
              max_new_tokens: int | None = None) -> Harmonisation:
    """The melody with a chord symbol at the start of every bar, chosen by the model.

    Chord symbols already in the tune are removed first. The grammar (`harmonise_grammar`)
    forces every other byte of the tune; each bar's chord is one of
    `chord_vocabulary(key, region=vocabulary == "key")` (vocabulary: "key" or "all"). The prompt
    is the "harmonise" task's (`ComposeRequest("harmonise", lang, melody=...)`), so
    `composer.compose(that request, constrained=True)` decodes the same answer."""
    melody = strip_chords(abc_text)  # once: the grammar and the budget read this melody
    grammar = _melody_grammar(melody, vocabulary)
    messages = composer.messages_for(ComposeRequest("harmonise", lang, melody=melody))
    if max_new_tokens is None:
        max_new_tokens = _melody_budget(melody)
    seed = 0 if seed is None else int(seed)
    comp = composer.chat(messages, grammar=grammar, seed=seed, temperature=temperature,
                         max_new_tokens=max_new_tokens)
    if comp.finish_reason != "stop":
        raise RuntimeError(f"the answer hit max_new_tokens={max_new_tokens} before the tune ended")
    chosen = [c for c in abc.QUOTED_CHORD_RE.findall(comp.text)]
    return Harmonisation(comp.text, chosen, seed, abc.validate(comp.text))
