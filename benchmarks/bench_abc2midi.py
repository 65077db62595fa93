"""A second opinion on the bar checker: `abc2midi` (Debian's abcmidi) against `abc.check_bars`.

Every tune of the open corpus (music21's bundled ABC, `corpus.load_music21_corpus`) is normalised
by `abc.normalize` (the text the model learns from and users download), then read by both:
  * ours: does `abc.check_bars` report any wrong-length bar?
  * abc2midi: does `abc2midi FILE -c -NFER` print a "Bar N has x time units while the time
    signature has y" warning? (`-c`: check only, no MIDI file; `-NFER`: read fermatas as written,
    since by default abc2midi plays a fermata note longer and then measures the played length.)
Tunes agree when both flag or both pass. Every disagreement gets a class from where abc2midi puts
its warning and what our reading says about the bar there (`classify`); RESULTS.md explains each
class and who is right by ABC 2.1 (https://abcnotation.com/wiki/abc:standard:v2.1). Two figures:
`agreement` counts every abc2midi warning; `agreement_written_bars` leaves out the warnings
abc2midi makes only while it replays repeats ("... in repeat": the bars as played, not as
written, which is what `check_bars` judges).

One worker process runs abc2midi while this process runs ours (the machine is shared).

    python benchmarks/bench_abc2midi.py             # the whole corpus (~13,000 tunes, minutes)
    python benchmarks/bench_abc2midi.py --limit 500 # a quick look (a fixed shuffle of the corpus)
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imelodist_lib import abc, corpus  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "abc2midi.json"
MARKDOWN = RESULTS.with_suffix(".md")
MUSIC21_RESULTS = ROOT / "benchmarks" / "results" / "abc.json"
ABC2MIDI = "abc2midi"
WARNING_RE = re.compile(r"line-char (\d+)-(\d+) : Track (\d+) Bar (\d+) has (\S+) time units "
                        r"while the time signature has (\S+)( in repeat)?")

# abc2midi errors after which it reads note lengths differently (not "Unrecognized chord name")
READING_ERRORS = ("Too many notes in chord", "Malformed note", "Cannot apply broken rhythm",
                  "Broken rhythm not allowed", "Chord already finished", "Not a valid microtone",
                  "nested tuples", "Intervening note needed", "Field not allowed",
                  "Attempt to nest chords", "Grace notes not allowed", "without matching",
                  "Could not find note to be tied", "Cannot find note before tie")
_ORNAMENT_RE = re.compile(r"[~T][\^_=]?[A-Ga-g]|![a-z]*(?:trill|roll|turn|mordent)[a-z]*!")
# class -> (who is right by ABC 2.1, why); the keys are what `classify` returns
CLASSES = {
    "abc2midi_repeat_playback": (
        "neither (a different question)",
        "abc2midi also checks the bars as it replays a repeat (warnings ending 'in repeat'): a "
        "tune that opens with a pickup and repeats from the start without `|:` plays the pickup "
        "again after a full last bar. ABC 2.1 defines the repeat but no bar-length rule; "
        "check_bars judges written bars and accepts this common engraving (O'Neill, Ryan)."),
    "part_pickup": (
        "ours",
        "a short bar right after a section break (`||`, `:|`, `|:`, `P:`) is the next part's "
        "pickup (`:| |:uB|`, `P:C` then `d2|`); abc2midi accepts a short bar only as the tune's "
        "first bar. ABC 2.1 sets no bar-length rule; pickups of later parts are usual notation."),
    "section_end_short": (
        "ours",
        "a short bar before a section break (`G6 Hx[|`, `B2 G2 G2::`) that the part's pickup "
        "completes: abc2midi carries the short bar into the next bar and flags their sum; ABC "
        "2.1 makes every bar line, `[|` and `::` included, end the bar."),
    "final_short": (
        "ours",
        "the tune's last bar is short and closed with a bar line (the pickup completes it on "
        "the repeat); abc2midi checks a final bar that has a bar line after it, ours accepts a "
        "short final bar (ABC 2.1 sets no rule; it is how anacrusis tunes are written)."),
    "abc2midi_ornament": (
        "ours",
        "the bar abc2midi flags holds a `~` roll or `T` trill: abc2midi plays ornaments as "
        "several notes and measures what it plays (`TG6-`, `He>~f`); ABC 2.1 decorations take no "
        "time."),
    "other_abc2midi_only": (
        "see examples",
        "abc2midi flags a bar ours reads as correct; seen by hand: a tie written at the start "
        "of the next line (`f4 |` then `-f4`), which is not ABC 2.1 (a tie follows its note), "
        "and abc2midi adds lengths across it."),
    "ours_first_bar_long": (
        "ours",
        "the first bar is longer than the meter (`B2B2B2AB2 |` in 2/4): abc2midi never checks "
        "the first bar (it may be an anacrusis, which is short); a long first bar is an error."),
    "ours_unbarred_voice": (
        "ours, strictly",
        "a voice written without any bar line (the Josquin parts): by ABC 2.1 the whole voice "
        "is one bar, which ours flags; abc2midi checks a bar only when it meets a bar line."),
    "abc2midi_error": (
        "ours",
        "no bar rule explains it and abc2midi reports a reading error in the tune (one of "
        "READING_ERRORS: 'Too many notes in chord', 'Not a valid microtone' on the old `-8va` "
        "clef word, 'nested tuples', 'Cannot apply broken rhythm', ...) after which it reads "
        "lengths differently or stops checking; ours reads these as ABC 2.1 writes them."),
    "ours_last_bar_long": (
        "ours",
        "the last bar is longer than the meter and the tune ends without a bar line: abc2midi "
        "checks a bar only when a bar line closes it."),
    "other_ours_only": (
        "see examples",
        "ours flags a bar abc2midi passes; seen by hand: a missing bar line inside a first "
        "ending (`|1 a2ag afdf gfed cBAF |`: a real error abc2midi does not check in endings), "
        "and a short second ending completed by the next part's pickup (`[2 D ||` then `f/g/|`),"
        " which ours is too strict about."),
}


def abc2midi_path() -> str | None:
    """The abc2midi executable on PATH, or None (install Debian's abcmidi: .ci/system-deps.sh)."""
    return shutil.which(ABC2MIDI)


def run_abc2midi(text: str) -> list[str]:
    """abc2midi's bar-length warnings and errors for one tune text (check only, fermatas as
    written). It runs in a temporary folder, since abc2midi writes `barloc.txt` where it runs."""
    with tempfile.TemporaryDirectory(prefix="abc2midi_") as tmp:
        path = Path(tmp) / "tune.abc"
        path.write_text(text, encoding="utf-8")
        try:
            done = subprocess.run([ABC2MIDI, str(path), "-c", "-NFER"], capture_output=True,
                                  text=True, timeout=60, errors="replace", cwd=tmp)
        except subprocess.TimeoutExpired:
            return ["Error: abc2midi timed out"]
    out = done.stdout + done.stderr
    return [line.strip() for line in out.splitlines()
            if "time units" in line or line.startswith("Error")]


def abc2midi_flags(lines: list[str], written_only: bool = False) -> bool:
    """Whether abc2midi's output reports a wrong-length bar (optionally only written bars)."""
    found = [WARNING_RE.search(x) for x in lines]
    return any(m and not (written_only and m.group(7)) for m in found)


def classify(text: str, ours: abc.BarReport, lines: list[str]) -> str:
    """The disagreement class of one tune (a key of CLASSES)."""
    warnings = [m for m in (WARNING_RE.search(x) for x in lines) if m]
    misread = any(x.startswith("Error") and any(k in x for k in READING_ERRORS) for x in lines)
    if ours.errors:  # ours flags, abc2midi passes
        by_voice: dict[str, int] = {}
        for b in ours.bars:
            by_voice[b.voice] = by_voice.get(b.voice, 0) + 1
        bars = {b.index: b for b in ours.bars}
        if all(by_voice[bars[e.bar].voice] == 1 for e in ours.errors):
            return "ours_unbarred_voice"
        first = {}
        for b in ours.bars:
            first.setdefault(b.voice, b.index)
        if all(first[bars[e.bar].voice] == e.bar and e.duration > e.expected
               for e in ours.errors):
            return "ours_first_bar_long"
        last = {}
        for b in ours.bars:
            last[b.voice] = b.index
        if all(last[bars[e.bar].voice] == e.bar and e.duration > e.expected and not
               bars[e.bar].right for e in ours.errors):
            return "ours_last_bar_long"
        return "abc2midi_error" if misread else "other_ours_only"
    if all(m.group(7) for m in warnings):
        return "abc2midi_repeat_playback"
    kinds = set()
    for m in warnings:
        if m.group(7):
            continue
        where = (int(m.group(1)), int(m.group(2)))
        before = [b for b in ours.bars if (b.line, b.col - 1) < where]
        if not before:
            kinds.add("other")
            continue
        bar = before[-1]
        prev = [b for b in before[:-1] if b.voice == bar.voice]
        if _ORNAMENT_RE.search(bar.text):
            kinds.add("abc2midi_ornament")
        elif bar.kind == "final":
            kinds.add("final_short")
        elif bar.kind == "pickup" and bar.index != 0:
            kinds.add("part_pickup" if not (prev and prev[-1].kind == "section_end"
                                            and prev[-1].duration + bar.duration
                                            != bar.expected) else "section_end_short")
        elif bar.kind == "section_end" or (prev and prev[-1].kind == "section_end"):
            kinds.add("section_end_short")
        else:
            kinds.add("other")
    for name in ("section_end_short", "part_pickup", "final_short", "abc2midi_ornament"):
        if kinds == {name}:
            return name
    if "other" in kinds or not kinds:
        return "abc2midi_error" if misread else "other_abc2midi_only"
    return sorted(kinds)[0]  # several classes in one tune: the first by name


def _markdown(results: dict) -> str:
    """The RESULTS.md section: figures beside music21's, then every class explained."""
    rows = [
        "Command: `" + results["command"] + "`\n",
        "| figure | value |", "|---|---|",
        f"| tunes read by both | {results['compared']} (of {results['tunes_total']}; ours "
        f"rejects {results['we_reject']}) |",
        f"| agreement with abc2midi, every warning | {results['agreement']} |",
        f"| agreement with abc2midi, written bars | {results['agreement_written_bars']} |",
        f"| agreement with music21 (events, benchmarks/bench_abc.py) | "
        f"{results['music21_agreement']} |",
        f"| both flag / both pass | {results['both_flag']} / {results['both_pass']} |",
        f"| only abc2midi flags / only ours flags | {results['only_abc2midi']} / "
        f"{results['only_ours']} |",
        "", "Fixed: Essen lines that end after a full bar with no bar line. ABC 2.1 joins "
        "them with the next line's first bar (abc2midi flags the joined bar), ours closed the "
        "bar there: `abc.normalize` now writes the `|` (and any accidental a note read across "
        "the line end). Before the fix (main at b066820, same command) agreement was 0.7294 "
        "(written bars 0.7474); 3,026 tunes were abc2midi-only flags, nearly all this class.",
        "", "| disagreement class | tunes | who is right | why | examples |", "|---|---|---|---|---|"]
    for name, entry in results["disagreements"].items():
        rows.append(f"| {name} | {entry['count']} | {entry['right']} | {entry['why']} | "
                    + ", ".join(entry["examples"][:3]) + " |")
    return "\n".join(rows) + "\n"


def main() -> int:
    """Run the comparison; write benchmarks/results/abc2midi.json and .md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="compare only N tunes")
    args = parser.parse_args()
    if abc2midi_path() is None:
        print("abc2midi is not installed (Debian: apt-get install abcmidi; see "
              ".ci/system-deps.sh): nothing compared", file=sys.stderr)
        return 1
    began = time.perf_counter()
    records = [r for r in corpus.load_music21_corpus() if r.abc]
    random.Random(0).shuffle(records)  # any --limit prefix spreads over all collections
    records = records[:args.limit] if args.limit else records
    texts: list[tuple[str, str]] = []
    rejected: dict[str, int] = {}
    for r in records:
        try:
            texts.append((r.id, abc.normalize(r.abc)))
        except abc.ABCError as err:
            reason = re.sub(r"'.*'", "'…'", err.message)
            rejected[reason] = rejected.get(reason, 0) + 1
    with multiprocessing.Pool(1) as pool:  # abc2midi in one worker while ours runs here
        pending = pool.map_async(run_abc2midi, [t for _, t in texts], chunksize=32)
        reports = [abc.check_bars(t) for _, t in texts]
        theirs = pending.get()
    counts = {"both_flag": 0, "both_pass": 0, "only_abc2midi": 0, "only_ours": 0}
    agree_written = 0
    classes: dict[str, dict] = {}
    for (rid, text), report, lines in zip(texts, reports, theirs):
        mine, other = bool(report.errors), abc2midi_flags(lines)
        agree_written += mine == abc2midi_flags(lines, written_only=True)
        if mine == other:
            counts["both_flag" if mine else "both_pass"] += 1
            continue
        counts["only_ours" if mine else "only_abc2midi"] += 1
        name = classify(text, report, lines)
        right, why = CLASSES[name]
        entry = classes.setdefault(name, {"count": 0, "right": right, "why": why,
                                          "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < 8:
            entry["examples"].append(rid)
    compared = len(texts)
    music21 = None
    if MUSIC21_RESULTS.exists():
        music21 = json.loads(MUSIC21_RESULTS.read_text(encoding="utf-8")).get("agreement")
    results = {
        "command": "python " + " ".join(["benchmarks/bench_abc2midi.py"] + sys.argv[1:]),
        "abc2midi": subprocess.run([ABC2MIDI, "-ver"], capture_output=True,
                                   text=True).stdout.strip(),
        "tunes_total": len(records),
        "we_reject": len(records) - compared,
        "we_reject_reasons": dict(sorted(rejected.items(), key=lambda kv: -kv[1])),
        "compared": compared,
        **counts,
        "agreement": round((counts["both_flag"] + counts["both_pass"]) / compared, 4)
        if compared else None,
        "agreement_written_bars": round(agree_written / compared, 4) if compared else None,
        "music21_agreement": music21,
        "seconds": round(time.perf_counter() - began, 1),
        "disagreements": dict(sorted(classes.items(), key=lambda kv: -kv[1]["count"])),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    MARKDOWN.write_text(_markdown(results), encoding="utf-8")
    print(json.dumps({k: v for k, v in results.items() if k not in ("disagreements",
                                                                       "we_reject_reasons")},
                     indent=2))
    print({k: v["count"] for k, v in results["disagreements"].items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
