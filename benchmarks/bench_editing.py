"""Editing with IMelodist-tiny on music21's corpus: harmonisation and bar regeneration.

Harmonise and regenerate are measured by `evaluation.editing_evaluation` (the evaluation's own
function, also shown in notebook 06) on 20 corpus tunes (the 2 short ones in music21's ABC corpus
that carry human chord symbols, music21's 2 MusicXML lead sheets imported with
`importing.import_melody`, then plain melodies). Harmonise: chords stripped, harmonised by the
shipped IMelodist-tiny (the "harmonise" task's prompt in Chinese; grammar: melody forced, one
chord per bar from the key's vocabulary). Each chord sequence is scored with
`evaluation.chord_adherence` (share of strong-beat melody notes that are tones of the bar's
chord) on the same melody: the model's, the corpus labeller's (`labels.fit_chords`), the human
chords (the first chord of each bar, the previous one carried into bars without; only the
chorded tunes), and a random pick from the same vocabulary (seeded); means with bootstrap 95 %
intervals over tunes.

Regenerate: two middle bars of the same tunes, written anew; the rate of answers that pass
`abc.validate` with no bar-length error, and of answers that keep every other bar byte for byte
(Wilson intervals). Ranking: for the
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
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imelodist_lib import abc  # noqa: E402
from imelodist_lib.editing import bar_spans, regenerate  # noqa: E402
from imelodist_lib.evaluation import editable_tune  # noqa: E402

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
            text = editable_tune(text, 8, 32 if has_chords else 16)
            if text is not None:
                (chorded if has_chords else plain).append(text)
    # music21's two lead sheets (MusicXML with chord symbols), read by our importer
    from imelodist_lib.importing import import_melody

    sheets = [import_melody(corpus.getWork(name)).abc for name in LEAD_SHEETS]
    return (chorded + sheets + plain)[:count]


def events_of(text: str, span) -> list[tuple]:
    return [(e.pitch, e.duration) for e in abc.events(text) if span.index == e.bar]


def main() -> None:
    import torch

    from imelodist_lib.evaluation import editing_evaluation
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
    edits = editing_evaluation(composer, tunes, seed=0, lang="zh")
    human_rows = [r for r in edits.rows if r["adherence_human"] is not None]
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
    figure = {s.metric: {"mean": round(s.mean, 3), "ci95": [round(s.ci_low, 3), round(s.ci_high, 3)], "n": s.n}
              for s in edits.summary}
    result = {
        "command": "python benchmarks/bench_editing.py --tunes %d --ranked %d" % (args.tunes, args.ranked),
        "model": "data/models/imelodist-tiny (shipped), transformers backend, 1 CPU thread",
        "measured_by": "evaluation.editing_evaluation(composer, tunes, seed=0, lang='zh')",
        "tunes": len(tunes),
        "harmonise_chord_adherence": {k.removeprefix("harmonise_adherence_"): v for k, v in figure.items()
                                      if k.startswith("harmonise_adherence_")},
        "harmonise_on_the_human_chorded_tunes_only": {
            source: round(statistics.mean(r[f"adherence_{source}"] for r in human_rows), 3)
            for source in ("model", "labeller", "random", "human")} if human_rows else None,
        "regenerate_valid": figure["regenerate_valid"],
        "regenerate_other_bars_kept": figure["regenerate_kept"],
        "rank_by_suffix": {
            "tunes": len(gains), "candidates": 4,
            "suffix_logprob_gain_nats_mean": round(statistics.mean(gains), 3),
            "suffix_logprob_gain_nats_min": round(min(gains), 3),
            "held_out_bar_similarity_ranked": round(statistics.mean(held_ranked), 3),
            "held_out_bar_similarity_unranked": round(statistics.mean(held_first), 3),
        },
        "per_tune": edits.to_dict()["rows"],
        "seconds": round(time.perf_counter() - start, 1),
    }
    OUT.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    OUT.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "per_tune"}, indent=2, ensure_ascii=False))


def markdown(result: dict) -> str:
    """The RESULTS.md section: harmonise adherence and regenerate rates with their intervals."""
    def cell(f: dict) -> str:
        return f"{f['mean']:.3f} [{f['ci95'][0]:.3f}, {f['ci95'][1]:.3f}] n={f['n']}"

    lines = [f"`{result['command']}` ({result['model']}; {result['measured_by']}; "
             f"{result['seconds']:.0f} s)\n", "| figure | mean [95 % interval] n=tunes |", "|---|---|"]
    lines += [f"| harmonise chord adherence: {k} | {cell(v)} |" for k, v in result["harmonise_chord_adherence"].items()]
    for k, v in (result["harmonise_on_the_human_chorded_tunes_only"] or {}).items():
        lines.append(f"| same, on the human-chorded tunes only: {k} | {v:.3f} |")
    lines += [f"| regenerated bars valid (abc.validate, no bar-length error) | {cell(result['regenerate_valid'])} |",
              f"| other bars kept byte for byte | {cell(result['regenerate_other_bars_kept'])} |"]
    rank = result["rank_by_suffix"]
    lines += [f"| rank_by_suffix ({rank['tunes']} tunes, {rank['candidates']} candidates): kept-suffix "
              f"log-likelihood gain, nats (mean / min) | {rank['suffix_logprob_gain_nats_mean']} / "
              f"{rank['suffix_logprob_gain_nats_min']} |",
              f"| held-out bar similarity, ranked vs unranked | {rank['held_out_bar_similarity_ranked']} vs "
              f"{rank['held_out_bar_similarity_unranked']} |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
