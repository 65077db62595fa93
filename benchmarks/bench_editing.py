"""Editing with IMelodist-tiny on music21's corpus: harmonisation and bar regeneration.

Harmonise: 20 corpus tunes (the 2 short ones in music21's ABC corpus that carry human chord
symbols, music21's 2 MusicXML lead sheets imported with `importing.import_melody`, then plain
melodies), chords stripped, harmonised by the shipped IMelodist-tiny (grammar: melody forced, one chord per bar from
the key's vocabulary). Each chord sequence is scored with `evaluation.chord_adherence` (share of
strong-beat melody notes that are tones of the bar's chord) on the same melody: the model's,
the corpus labeller's (`labels.fit_chords`), the human chords (the first chord of each bar, the
previous one carried into bars without; only the chorded tunes), and a random pick from the same vocabulary (seeded).

Regenerate: two middle bars of the same tunes, written anew; the rate of answers that pass
`abc.validate` with no bar-length error and keep every other bar unchanged. Ranking: for the
first 10 tunes, 4 candidates for one middle bar; the ranked pick's kept-suffix log-likelihood
(nats) against the unranked first candidate's (the gain is >= 0 by construction; its size is
the figure), and how close each pick's notes come to the bar the composer really wrote (difflib
ratio over (pitch, duration) events; the original bar is held out, so this can go either way).

    python benchmarks/bench_editing.py            # ~20 tunes, a few minutes on one thread
    python benchmarks/bench_editing.py --tunes 5
"""
from __future__ import annotations

import argparse
import difflib
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imelodist_lib import abc  # noqa: E402
from imelodist_lib.labels import fit_chords  # noqa: E402
from imelodist_lib.editing import bar_spans, chord_vocabulary, harmonise, regenerate, strip_chords  # noqa: E402
from imelodist_lib.evaluation import chord_adherence, parse_answer  # noqa: E402
from imelodist_lib.instructions import chords_per_bar  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "editing.json"
LEAD_SHEETS = ("leadSheet/fosterBrownHair.mxl", "leadSheet/berlinAlexandersRagtime.mxl")


def bench_tunes(count: int) -> list[str]:
    """Corpus tunes (one voice, valid, no bar errors): first every ABC tune of 8-32 bars that
    carries human chord symbols (>= 8; music21's ABC corpus holds only 2), the 2 lead sheets,
    then plain melodies of 8-16 bars in corpus order."""
    from music21 import corpus

    chorded, plain = [], []
    for path in sorted(corpus.getPaths(fileExtensions=("abc",))):
        for text in abc.split_tunes(path.read_text(encoding="latin-1")):
            has_chords = len(abc.QUOTED_CHORD_RE.findall(text)) >= 8
            if not has_chords and len(plain) >= count:
                continue  # cheap filter before parsing
            try:
                text = abc.normalize(text)
                report = abc.validate(text)
                if not report.ok or report.bars.errors or len({e.voice for e in abc.events(text)}) > 1:
                    continue
                if not 8 <= len(bar_spans(text)) <= (32 if has_chords else 16):
                    continue
            except (abc.ABCError, ValueError):
                continue
            (chorded if has_chords else plain).append(text)
    # music21's two lead sheets (MusicXML with chord symbols), read by our importer
    from imelodist_lib.importing import import_melody

    sheets = [import_melody(corpus.getWork(name)).abc for name in LEAD_SHEETS]
    return (chorded + sheets + plain)[:count]


def carried(chords: list[str | None]) -> list[str]:
    out, last = [], next((c for c in chords if c), "C")
    for c in chords:
        last = c or last
        out.append(last)
    return out


def events_of(text: str, span) -> list[tuple]:
    return [(e.pitch, e.duration) for e in abc.events(text) if span.index == e.bar]


def main() -> None:
    import torch

    from imelodist_lib.inference import Composer
    from imelodist_lib.profiles import SHIPPED_MODEL_DIR

    parser = argparse.ArgumentParser()
    parser.add_argument("--tunes", type=int, default=20)
    parser.add_argument("--ranked", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    composer = Composer(str(SHIPPED_MODEL_DIR), backend="transformers", cpu_threads=1)
    tunes = bench_tunes(args.tunes)
    scores: dict[str, list[float]] = {"model": [], "labeller": [], "human": [], "random": []}
    valid = kept = 0
    human_tunes: list[int] = []
    for i, text in enumerate(tunes):
        melody = strip_chords(text)
        parsed = parse_answer(melody)
        n_bars = len(bar_spans(melody))
        vocab = chord_vocabulary(abc.parse_tune(melody).key)
        rng = random.Random(i)
        labelled = dict(fit_chords(melody))
        sequences = {
            "model": harmonise(composer, melody, seed=i).chords,
            "labeller": carried([labelled.get(s.index) for s in bar_spans(melody)]),
            "random": [rng.choice(vocab) for _ in range(n_bars)],
        }
        if any(chords_per_bar(text)):
            sequences["human"] = carried(chords_per_bar(text))
            human_tunes.append(i)
        for name, chords in sequences.items():
            value = chord_adherence(parsed, chords)
            if value is not None:
                scores[name].append(value)
        middle = range(n_bars // 2, n_bars // 2 + 2)
        [r] = regenerate(composer, text, middle, seed=i)
        valid += bool(r.report.ok and not r.report.bars.errors)
        old, new = bar_spans(text), bar_spans(r.abc)
        kept += all(text[a.start:a.end] == r.abc[b.start:b.end]
                    for k, (a, b) in enumerate(zip(old, new)) if k not in middle) and len(old) == len(new)
    gains, held_ranked, held_first = [], [], []
    for i, text in enumerate(tunes[: args.ranked]):
        n_bars = len(bar_spans(text))
        bar = range(n_bars // 2, n_bars // 2 + 1)
        candidates = regenerate(composer, text, bar, n=4, seed=100 + i, rank_by_suffix=True, candidates=4)
        first = next(c for c in candidates if c.seed == 100 + i)  # what an unranked call returns
        best = candidates[0]
        gains.append(best.suffix_logprob - first.suffix_logprob)
        truth = events_of(text, bar_spans(text)[bar.start])
        for pick, out in ((best, held_ranked), (first, held_first)):
            got = events_of(pick.abc, bar_spans(pick.abc)[bar.start])
            out.append(difflib.SequenceMatcher(None, truth, got).ratio())
    result = {
        "command": "python benchmarks/bench_editing.py --tunes %d --ranked %d" % (args.tunes, args.ranked),
        "model": "data/models/imelodist-tiny (shipped), transformers backend, 1 CPU thread",
        "tunes": len(tunes),
        "harmonise_chord_adherence_mean": {k: round(statistics.mean(v), 3) for k, v in scores.items() if v},
        "harmonise_scored_tunes": {k: len(v) for k, v in scores.items()},
        "harmonise_on_the_human_chorded_tunes_only": {
            k: round(statistics.mean(v[j] for j in human_tunes), 3) for k, v in scores.items()
            if k != "human" and len(v) == len(tunes)} | {"human": round(statistics.mean(scores["human"]), 3)
                                                          if scores["human"] else None},
        "regenerate_valid_rate": round(valid / len(tunes), 3),
        "regenerate_other_bars_kept_rate": round(kept / len(tunes), 3),
        "rank_by_suffix": {
            "tunes": len(gains), "candidates": 4,
            "suffix_logprob_gain_nats_mean": round(statistics.mean(gains), 3),
            "suffix_logprob_gain_nats_min": round(min(gains), 3),
            "held_out_bar_similarity_ranked": round(statistics.mean(held_ranked), 3),
            "held_out_bar_similarity_unranked": round(statistics.mean(held_first), 3),
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
    OUT.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
