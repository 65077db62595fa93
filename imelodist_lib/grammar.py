"""Guaranteed-valid ABC: a per-request EBNF grammar and an xgrammar logits processor.

A bar of fixed length is a regular language: with durations counted in a small step
(half of the unit note length L, or a quarter of it when L is a quarter note or longer),
`bar_k` = "the rest of a bar with k steps still to fill" has one alternative per note
length d <= k, followed by `bar_(k-d)`. The bar-sequence rules count bars (so the tune
ends after `min_bars..max_bars`) and track one bit of state (inside a `|: ... :|` repeat
or not) so repeat signs and first/second endings always pair up. The header lines are
fixed to the requested values, so the model only chooses the music.

The grammar uses xgrammar's EBNF dialect (llama.cpp GBNF); `grammar_logits_processor`
compiles it for one tokenizer and returns a transformers `LogitsProcessor` that masks
every token which would leave the grammar.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from typing import TYPE_CHECKING

from imelodist_lib.abc import ABCError, check_bars, meter_duration, parse_tune, unit_length_of

if TYPE_CHECKING:
    from imelodist_lib.instructions import ComposeRequest

# Chord-symbol qualities a lead sheet uses; kept short so the grammar stays small.
CHORD_QUALITIES = ("m", "7", "m7", "maj7", "dim", "dim7", "aug", "sus2", "sus4", "6", "m6", "9")
# Note lengths (in units of L) a normalised tune writes; others are rare enough to leave out.
NOTE_LENGTHS = tuple(Fraction(x) for x in ("1/4", "1/2", "3/4", "1", "3/2", "2", "3", "4", "6", "8"))
TITLE_CHARS = r"[ -;=?-{}~\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]"
DEFAULT_MAX_BARS = 64  # a cap keeps the unrolled bar counter finite when none is asked
# A request that names no length gets a tune of this many bars (a typical 8+8 or 16+16 tune).
REQUEST_BAR_RANGE = (8, 32)


@dataclass(frozen=True)
class BarPlan:
    """How one request's bars are measured: the step and the bar length in steps."""

    unit_length: Fraction  # L as a fraction of a whole note (ABC's convention)
    steps_per_unit: int  # step = L / steps_per_unit
    bar_steps: int  # one full bar of the meter, in steps

    def length_suffix(self, steps: int) -> list[str]:
        """The ABC length suffixes that write `steps` steps (e.g. 1 step of L/2 -> '/', '/2')."""
        value = Fraction(steps, self.steps_per_unit)
        if value == 1:
            return [""]
        if value.denominator == 1:
            return [str(value.numerator)]
        if value.numerator == 1:
            return ["/", "/2"] if value.denominator == 2 else [f"/{value.denominator}"]
        return [f"{value.numerator}/{value.denominator}"]


def plan_bars(meter: str, unit_length: str | Fraction) -> BarPlan:
    """Measure a meter's bar in grammar steps; fails clearly when L does not divide it."""
    unit = Fraction(unit_length)
    if unit <= 0:
        raise ValueError(f"unit note length {unit_length!r} must be positive, e.g. '1/8'")
    bar_quarters = meter_duration(meter)
    if bar_quarters is None:
        raise ValueError(f"meter {meter!r} is free (no bar length): give a meter such as '4/4' or '6/8'")
    steps_per_unit = 4 if unit >= Fraction(1, 4) else 2
    step_quarters = unit * 4 / steps_per_unit
    bar_steps = bar_quarters / step_quarters
    if bar_steps.denominator != 1:
        raise ValueError(f"meter {meter!r} is not a whole number of L={unit} steps; "
                         f"choose L:1/8 or L:1/16")
    return BarPlan(unit, steps_per_unit, int(bar_steps))


def _literal(text: str) -> str:
    """An EBNF string literal for `text` (quotes, backslashes and newlines escaped)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _alternatives(items: list[str]) -> str:
    return " | ".join(items) if items else '""'


def _chord_symbol_rule(symbols: list[str] | None) -> str:
    if symbols:
        return _alternatives([_literal(f'"{s}"') for s in sorted(set(symbols))])
    qualities = _alternatives([_literal(q) for q in CHORD_QUALITIES])
    return f'"\\"" [A-G] ("#" | "b")? ({qualities})? ("/" [A-G] ("#" | "b")?)? "\\""'


def _element_rules(plan: BarPlan) -> tuple[list[str], dict[int, str]]:
    """Rules for the things a bar is made of, grouped by duration in steps.

    Returns the rule lines and, per duration, the name of the rule that writes one element
    of exactly that duration (a note, rest, chord, broken-rhythm pair or triplet)."""
    lines = [
        'pitch ::= ("^" | "_" | "=" | "^^" | "__")? ([A-G] ","? ","? | [a-g] "\'"? "\'"?)',
        'chordnotes ::= "[" pitch pitch pitch? "]"',
    ]
    per_duration: dict[int, list[str]] = {}
    lengths = [int(x * plan.steps_per_unit) for x in NOTE_LENGTHS
               if (x * plan.steps_per_unit).denominator == 1 and x * plan.steps_per_unit <= plan.bar_steps]
    for steps in lengths:
        suffix = _alternatives([_literal(s) for s in plan.length_suffix(steps)])
        lines.append(f"len{steps} ::= {suffix}")
        per_duration.setdefault(steps, []).extend(
            [f'pitch len{steps} "-"?', f'"z" len{steps}', f"chordnotes len{steps}"])
    for nominal in lengths:
        # a>b: the first note dotted, the second halved; the pair lasts two nominal notes.
        # (3abc: three notes in the time of two. Both keep to notes no longer than L.
        if nominal > plan.steps_per_unit or 2 * nominal > plan.bar_steps:
            continue
        if nominal % 2 == 0:
            per_duration.setdefault(2 * nominal, []).append(
                f'pitch len{nominal} (">" | "<") pitch len{nominal}')
        per_duration.setdefault(2 * nominal, []).append(
            f'"(3" pitch len{nominal} pitch len{nominal} pitch len{nominal}')
    names = {}
    for steps in sorted(per_duration):
        names[steps] = f"el{steps}"
        lines.append(f"el{steps} ::= {_alternatives(per_duration[steps])}")
    return lines, names


def _bar_rules(plan: BarPlan, elements: dict[int, str], chords_inside: bool) -> list[str]:
    """`fill{k}`: the rest of a bar with k steps to go; `fill{bar}` is one whole bar."""
    lines = []
    chord = 'chordsym? ' if chords_inside else ""
    for k in range(1, plan.bar_steps + 1):
        alts = []
        for d, name in elements.items():
            if d == k:
                alts.append(f"{chord}{name}")
            elif d < k:
                alts.append(f'{chord}{name} " "? fill{k - d}')
        if alts:
            lines.append(f"fill{k} ::= {_alternatives(alts)}")
    return lines


def _reachable(rules: list[str], root: str = "root") -> list[str]:
    """Keep only rules reachable from the root (xgrammar rejects unused or undefined ones)."""
    by_name = {line.split(" ::= ", 1)[0]: line for line in rules}
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        body = re.sub(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]', " ", by_name[name].split(" ::= ", 1)[1])
        todo.extend(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", body))
    return [line for line in rules if line.split(" ::= ", 1)[0] in seen]


def _prefix_state(prefix_body: str, meter: str, unit_length: str | Fraction, key: str) -> tuple[int, bool]:
    """Bars written and whether a `|:` repeat is still open at the end of a forced prefix. Bars
    are counted as `abc` reads them, so an Essen-style line that ends one full bar without a bar
    line counts as a bar (splitting on bar lines alone missed it, and a continuation of such a
    tune got more bars than asked)."""
    tune = f"X:1\nM:{meter.strip()}\nL:{Fraction(unit_length)}\nK:{key.strip()}\n{prefix_body}\n"
    try:
        report = check_bars(parse_tune(tune))
        voice = report.bars[0].voice if report.bars else None
        bars = len([b for b in report.bars if b.voice == voice])
    except ABCError:  # not readable as ABC: the forced text is still kept; count by bar lines
        bars = len([b for b in re.split(r":?\|[:\]|]?|::", prefix_body) if re.search(r"[A-Ga-gz]", b)])
    open_repeat = False
    for sign in re.findall(r"\|:|:\||::", prefix_body):
        open_repeat = sign in ("|:", "::")
    return bars, open_repeat


def abc_grammar(meter: str, unit_length: str | Fraction, key: str, title: str | None = None,
                max_bars: int | None = None, min_bars: int = 4, tempo: int | None = None,
                allow_chords: bool = True, chord_symbols: list[str] | None = None,
                prefix_abc: str | None = None, bars_per_line: int = 4) -> str:
    """An EBNF grammar for one whole normalised ABC tune whose every bar is exactly full.

    The header is fixed (X:1, T: `title` or any title, M:, L:, Q:1/4=`tempo` when given, K:);
    the body has `min_bars..max_bars` full bars (exactly `len(chord_symbols)` when a chord
    progression is forced, one symbol at the start of each bar), a line break every
    `bars_per_line` bars, optional `|: :|` repeats with `[1`/`[2` endings, and ends with `|]`
    or `:|`. `prefix_abc` (the opening bars of a continuation, body only or a whole tune opening
    with its header) is forced verbatim, header included; the new bars follow it.
    """
    plan = plan_bars(meter, unit_length)
    for name, value in (("meter", meter), ("key", key), ("unit_length", str(unit_length))):
        if not str(value).strip() or "\n" in str(value):
            raise ValueError(f"{name} {value!r} must be a one-line ABC header value")
    if title and re.search("[\x00-\x1f\x7f\x85\u2028\u2029]", title):  # would add header lines
        raise ValueError(f"title {title!r} holds a line break or control character: give one line of text")
    if chord_symbols is not None:
        if not chord_symbols:
            raise ValueError("chord_symbols is empty: give one chord symbol per bar, e.g. ['G','C','D','G']")
        min_bars = max_bars = len(chord_symbols)
    if max_bars is None:
        max_bars = max(DEFAULT_MAX_BARS, min_bars)
    if min_bars < 1 or max_bars < min_bars:
        raise ValueError(f"need 1 <= min_bars <= max_bars, got min_bars={min_bars}, max_bars={max_bars}")

    header = "X:1\n"
    # a free title is one short line of printable ASCII (no '<' '>' '|', so no chat marker or bar
    # line leaks in) or CJK text; whole characters only, so the bytes always decode
    title_rule = f'"T:" {_literal(title.strip())}' if title else f'"T:" {TITLE_CHARS}{{1,60}}'
    meta = f"M:{meter.strip()}\nL:{Fraction(unit_length)}\n"
    if tempo is not None:
        meta += f"Q:1/4={int(tempo)}\n"
    meta += f"K:{key.strip()}\n"
    rules = [f'root ::= {_literal(header)} {title_rule} {_literal(chr(10) + meta)} body "\\n"?']

    element_lines, elements = _element_rules(plan)
    forced = chord_symbols is not None
    chords_inside = allow_chords and not forced
    rules += element_lines + _bar_rules(plan, elements, chords_inside)
    rules.append(f"chordsym ::= {_chord_symbol_rule(None)}")
    full = f"fill{plan.bar_steps}"

    start_bar, start_open, prefix_header, prefix_body = 0, False, "", ""
    if prefix_abc:
        fields, prefix_body = header_fields(prefix_abc)
        if "K" in fields:  # a whole tune opening: its header is forced as written too
            prefix_header = prefix_abc.strip()[: len(prefix_abc.strip()) - len(prefix_body.strip())]
        prefix_body = prefix_body.strip()
        if not re.search(r"(\||::)$", prefix_body):
            raise ValueError("prefix_abc must end with a bar line: pass whole opening bars, e.g. 'GABc dedB|'")
        start_bar, start_open = _prefix_state(prefix_body, meter, unit_length, key)
        if start_bar >= max_bars:
            raise ValueError(f"prefix_abc already has {start_bar} bars, max_bars is {max_bars}")
        min_bars = max(min_bars, start_bar + 1)

    def bar(i: int) -> str:
        """Bar number i (1-based): its chord symbol when a progression is forced, then the notes."""
        if forced:
            return f"{_literal(chr(34) + chord_symbols[i - 1] + chr(34))} {full}"
        return full

    def sep(i: int) -> str:
        """What follows the bar line after bar i: a line break every few bars, else a space."""
        return '"\\n"' if i % bars_per_line == 0 else '" "'

    # seq{i}{s}: the tune after i bars, just after a bar line, state s = o (outside a repeat)
    # or r (inside |: ... ). Each alternative writes one bar (or a 2-bar [1 .. :|[2 .. group).
    for i in range(start_bar, max_bars):
        n = i + 1
        can_end = n >= min_bars
        for state in ("o", "r"):
            alts = []
            nxt_o, nxt_r = f"seq{n}o", f"seq{n}r"
            last = n == max_bars
            if state == "o":
                if not last:
                    alts.append(f'{bar(n)} " |" {sep(n)} {nxt_o}')
                    alts.append(f'{bar(n)} " |:" {sep(n)} {nxt_r}')
                if can_end:
                    alts.append(f'{bar(n)} " |]"')
            else:
                if not last:
                    alts.append(f'{bar(n)} " |" {sep(n)} {nxt_r}')
                    alts.append(f'{bar(n)} " :|" {sep(n)} {nxt_o}')
                    alts.append(f'{bar(n)} " ::" {sep(n)} {nxt_r}')
                if can_end:
                    alts.append(f'{bar(n)} " :|"')
                # first and second ending: bar n inside [1, bar n+1 inside [2, both full
                m = n + 1
                if m <= max_bars and not forced:
                    group = f'"[1 " {full} " :|" {sep(n)} "[2 " {full}'
                    if m < max_bars:
                        alts.append(f'{group} " |" {sep(m)} seq{m}o')
                    if m >= min_bars:
                        alts.append(f'{group} " |]"')
            rules.append(f"seq{i}{state} ::= {_alternatives(alts)}")

    if prefix_abc:
        opening = f"{_literal(prefix_body)} (\" \" | \"\\n\") seq{start_bar}{'r' if start_open else 'o'}"
        if prefix_header:
            rules[0] = f'root ::= {_literal(prefix_header)} body "\\n"?'
    else:
        opening = 'seq0o | "|: " seq0r'
    rules.append(f"body ::= {opening}")
    return "\n".join(_reachable(rules)) + "\n"


# --- xgrammar: tokenizer info is costly (walks the whole vocabulary), so it is built once ---
_COMPILERS: dict[tuple, object] = {}


def stop_token_ids(tokenizer) -> list[int]:
    """The ids that end an answer: EOS and the chat template's `<|im_end|>` when present."""
    ids = []
    for token in (tokenizer.eos_token, "<|im_end|>"):
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    if not ids:
        raise ValueError("tokenizer has no EOS or <|im_end|> token: constrained decoding needs a stop token")
    return ids


def grammar_compiler(tokenizer, vocab_size: int | None = None):
    """An xgrammar `GrammarCompiler` for this tokenizer, cached (it keeps its own grammar cache)."""
    import xgrammar as xgr

    key = (id(tokenizer), getattr(tokenizer, "name_or_path", ""), len(tokenizer), vocab_size)
    if key not in _COMPILERS:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=stop_token_ids(tokenizer))
        # keep the tokenizer alive with its entry so id() cannot be reused by another object
        _COMPILERS[key] = (xgr.GrammarCompiler(info, max_threads=2), tokenizer)
    return _COMPILERS[key][0]


def compile_grammar(tokenizer, grammar: str, vocab_size: int | None = None):
    """Compile an EBNF grammar for a tokenizer (cached per grammar text by xgrammar)."""
    try:
        return grammar_compiler(tokenizer, vocab_size).compile_grammar(grammar)
    except RuntimeError as err:
        raise ValueError(f"the grammar does not compile: {str(err).splitlines()[0]}") from err


def grammar_logits_processor(tokenizer, grammar: str, vocab_size: int | None = None):
    """A transformers LogitsProcessor that only lets tokens through which keep to `grammar`.

    Pass the model's `config.vocab_size` as `vocab_size` when it differs from the
    tokenizer's length. One processor serves one `generate()` call (any batch size)."""
    from xgrammar.contrib.hf import LogitsProcessor

    return LogitsProcessor(compile_grammar(tokenizer, grammar, vocab_size))


def header_fields(abc_text: str) -> tuple[dict[str, str], str]:
    """The header fields (first value of each letter) and the body text of one ABC tune."""
    fields: dict[str, str] = {}
    lines = abc_text.strip().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^([A-Za-z]):(.*)$", line.strip())
        if not match:
            return fields, "\n".join(lines[i:])
        fields.setdefault(match.group(1), match.group(2).strip())
        if match.group(1) == "K":
            return fields, "\n".join(lines[i + 1:])
    return fields, ""


def _default_unit(meter: str) -> str | None:
    """A seed without L: means ABC 2.1's default for its meter (`abc.unit_length_of`), as the
    seed's notes are read; None when the meter is unreadable."""
    try:
        unit = unit_length_of(meter)
    except ABCError:
        return None
    return f"{unit.numerator}/{unit.denominator}"


def _request_grammar_args(request: "ComposeRequest", unit_length: str = "1/8",
                          bar_range: tuple[int, int] = REQUEST_BAR_RANGE) -> dict:
    """The `abc_grammar` arguments that answer one composing request (see grammar_for_request)."""
    if request.task == "describe":
        raise ValueError("task 'describe' answers in prose: constrained mode is for the composing "
                         "tasks (emotion, chords, theme_chords, continue)")
    seed_fields, seed_body = header_fields(request.seed_abc) if request.seed_abc else ({}, "")
    meter = request.meter or seed_fields.get("M") or "4/4"
    unit = seed_fields.get("L") or (_default_unit(seed_fields.get("M", "none")) if request.seed_abc
                                    else None) or unit_length
    key = request.key or seed_fields.get("K") or "C"
    title = request.theme if request.task == "theme_chords" else None
    if request.task == "continue":
        title = seed_fields.get("T") or None
    min_bars, max_bars = bar_range
    if request.bars:
        min_bars = max_bars = request.bars
    prefix = None
    if request.task == "continue":
        prefix = request.seed_abc.strip()
        if not re.search(r"(\||::)$", prefix):
            prefix += " |"  # the seed stops at the end of a bar; close it so the next bar starts
        already, _ = _prefix_state(seed_body, seed_fields.get("M") or meter, unit,
                                   seed_fields.get("K") or key)
        max_bars = max(max_bars, already + 1)
        min_bars = min(max(min_bars, already + 1), max_bars)
    chords = request.chords if request.task in ("chords", "theme_chords") else None
    return dict(meter=meter, unit_length=unit, key=key, title=title, min_bars=min_bars,
                max_bars=max_bars, tempo=request.tempo, chord_symbols=chords, prefix_abc=prefix)


def grammar_for_request(request: "ComposeRequest", unit_length: str = "1/8",
                        bar_range: tuple[int, int] = REQUEST_BAR_RANGE) -> str:
    """The guaranteed-valid grammar that answers one `ComposeRequest` (composing tasks only).

    Meter, key and tempo come from the request, else from the seed tune (continuations),
    else 4/4 in C; the length is `request.bars` when given (the chord count for chord tasks),
    else `bar_range`; a continuation's seed bars are forced verbatim before the new ones.
    "harmonise": the melody forced, one chord free per bar (`editing.harmonise_grammar`)."""
    if request.task == "harmonise":
        from imelodist_lib.editing import harmonise_grammar  # editing builds on this module

        return harmonise_grammar(request.melody)
    return abc_grammar(**_request_grammar_args(request, unit_length, bar_range))


def token_budget(request: "ComposeRequest", unit_length: str = "1/8",
                 bar_range: tuple[int, int] = REQUEST_BAR_RANGE) -> int:
    """Generous max_new_tokens for a constrained answer: a tune cut off by the limit is invalid.

    Bound: the longest tune the grammar allows, at two tokens per grammar step (a note and a
    space), plus bar lines, chord symbols, the header and a forced continuation prefix."""
    if request.task == "harmonise":
        from imelodist_lib.editing import harmonise_budget  # editing builds on this module

        return harmonise_budget(request.melody)
    args = _request_grammar_args(request, unit_length, bar_range)
    bars = max(args["max_bars"], len(args["chord_symbols"] or ()))
    steps = plan_bars(args["meter"], args["unit_length"]).bar_steps
    prefix = len(args["prefix_abc"] or "")
    return bars * (2 * steps + 8) + 64 + prefix


def grammar_accepts(grammar: str, text: str) -> bool:
    """Whether `grammar` accepts the whole of `text` (no tokenizer needed: checks characters)."""
    return check_against_grammar(grammar, text).accepted


_CHARACTER_COMPILER: list = []  # one compiler without a vocabulary, keeping its grammar cache


def _character_grammar(grammar: str):
    """`grammar` compiled for matching characters (one thread: more only contend, 30x slower)."""
    import xgrammar as xgr

    if not _CHARACTER_COMPILER:
        _CHARACTER_COMPILER.append(xgr.GrammarCompiler(xgr.TokenizerInfo([]), max_threads=1))
    return _CHARACTER_COMPILER[0].compile_grammar(grammar)


@dataclass(frozen=True)
class GrammarCheck:
    """How a text fares against a grammar, character by character."""

    accepted: bool  # the whole text is one complete sentence of the grammar
    refused_at: int | None  # index of the first character the grammar refuses (None: none is)


def check_against_grammar(grammar: str, text: str) -> GrammarCheck:
    """Walk `text` through `grammar`: where it first leaves it, and whether it ends complete.

    A text that keeps to the grammar but stops early (cut off by the token limit) has
    `refused_at=None, accepted=False`."""
    import xgrammar as xgr

    compiled = _character_grammar(grammar)
    matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
    if matcher.accept_string(text):
        return GrammarCheck(matcher.is_terminated(), None)
    matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
    for i, char in enumerate(text):  # only on failure: find the character, for the message
        if not matcher.accept_string(char):
            return GrammarCheck(False, i)
    return GrammarCheck(False, len(text))


# --- the grammar as each engine takes it (pure functions: tests compile these exact payloads) ---


def lmdeploy_response_format(grammar: str) -> dict:
    """LMDeploy's `GenerationConfig.response_format` for an EBNF grammar: an xgrammar
    structural tag holding it (LMDeploy compiles it with `compile_structural_tag`)."""
    return {"type": "structural_tag", "format": {"type": "grammar", "grammar": grammar}}


def vllm_structured_outputs(grammar: str) -> dict:
    """The request fields that make a vLLM server decode under an EBNF grammar (vLLM compiles it
    with xgrammar's `compile_grammar`; vLLM before `structured_outputs` took `{"guided_grammar": g}`,
    a field it removed in 0.12)."""
    return {"structured_outputs": {"grammar": grammar}}


# --- public building blocks for grammars over part of a tune (imelodist_lib.editing) ---
def bar_fill_rules(plan: BarPlan, chords_inside: bool = False) -> list[str]:
    """The rule lines for bar contents: `fill{k}` writes exactly k steps of notes and rests
    (chord symbols inside only when `chords_inside`); `chordsym` is any chord symbol."""
    element_lines, elements = _element_rules(plan)
    return element_lines + _bar_rules(plan, elements, chords_inside) + [f"chordsym ::= {_chord_symbol_rule(None)}"]


def ebnf_literal(text: str) -> str:
    """An EBNF string literal for `text` (as the tune grammar writes its fixed parts)."""
    return _literal(text)


def reachable_rules(rules: list[str], root: str = "root") -> list[str]:
    """Only the rules reachable from `root` (xgrammar rejects unused or undefined ones)."""
    return _reachable(rules, root)
