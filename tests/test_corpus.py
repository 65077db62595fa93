"""Tests for imelodist_lib.corpus on real tunes from music21's bundled corpus."""
from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from imelodist_lib import abc, corpus, labels
from imelodist_lib.corpus import TuneRecord
from imelodist_lib.profiles import get_profile


@pytest.fixture(scope="module")
def all_raw() -> list[TuneRecord]:
    return corpus.load_music21_corpus()


@pytest.fixture(scope="module")
def sample(all_raw) -> list[TuneRecord]:
    """~300 real tunes from every melodic collection (every 40th tune: deterministic)."""
    return all_raw[::40]


@pytest.fixture()
def profile(tmp_path):
    return get_profile("cpu", workdir=tmp_path / "runs")


# ------------------------------------------------------------------ loading
def test_music21_loader_finds_every_collection_with_provenance(all_raw):
    counts = Counter(r.source for r in all_raw)
    assert set(counts) == {"essenFolksong", "oneills1850", "ryansMammoth", "airdsAirs", "miscFolk",
                           "nottingham-dataset", "josquin"}
    assert counts["essenFolksong"] == 8514 and counts["oneills1850"] == 2009
    assert len(all_raw) == 12978
    # The Chinese songs of the Essen collection are there (han1/han2).
    assert sum(1 for r in all_raw if "/han" in r.file) == 1224
    assert len({r.id for r in all_raw}) == len(all_raw)  # ids are unique
    assert all(r.licence and r.file and r.abc.startswith("X:") for r in all_raw)
    essen = next(r for r in all_raw if r.source == "essenFolksong")
    assert "non-commercial" in essen.licence
    han = next(r for r in all_raw if r.id.startswith("essenFolksong/han1.abc#"))
    assert han.id == "essenFolksong/han1.abc#1"


def test_music21_loader_limit_and_unknown_collection():
    assert len(corpus.load_music21_corpus(["ryansMammoth"], limit=5)) == 5
    with pytest.raises(ValueError, match="no ABC collection"):
        corpus.load_music21_corpus(["beethoven"])


def test_load_abc_folder(tmp_path, all_raw):
    (tmp_path / "tunes" / "sub").mkdir(parents=True)
    (tmp_path / "tunes" / "a.abc").write_text("\n\n".join(r.abc for r in all_raw[:3]), encoding="utf-8")
    (tmp_path / "tunes" / "sub" / "b.abc").write_text(all_raw[5000].abc, encoding="utf-8")
    recs = corpus.load_abc_folder(tmp_path / "tunes", licence="CC0 (test)")
    assert [r.file for r in recs] == ["tunes/a.abc"] * 3 + ["tunes/sub/b.abc"]
    assert recs[0].id == "tunes/a.abc#0001" and recs[0].licence == "CC0 (test)"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        corpus.load_abc_folder(tmp_path / "missing")


# ------------------------------------------------------------------ records
def test_jsonl_round_trip(tmp_path, sample, profile):
    kept, _ = corpus.clean(sample[:20], profile)
    recs = labels.label_tunes(corpus.split_by_family(kept, profile))
    path = corpus.write_jsonl(recs, tmp_path / "t.jsonl")
    back = corpus.read_jsonl(path)
    assert back == recs
    assert path.read_text(encoding="utf-8").count("\n") == len(recs)
    with pytest.raises(ValueError, match="no field"):
        TuneRecord.from_dict({**recs[0].to_dict(), "bogus": 1})
    with pytest.raises(FileNotFoundError, match="notebook 01"):
        corpus.read_jsonl(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------ cleaning
def test_clean_counts_every_drop(sample, profile):
    first = sample[0]
    garbage = TuneRecord(id="x/garbage#1", abc="X:1\nT:broken\nM:4/4\nK:Q#z\nabc|", source="x")
    two_voices = TuneRecord(id="x/voices#1", abc="X:1\nM:2/4\nL:1/8\nK:C\nV:1\nCDEF|GABc|\nV:2\nC,4|G,4|\n",
                            source="x")
    short = TuneRecord(id="x/short#1", abc="X:1\nM:2/4\nL:1/8\nK:C\nCDEF|GABc|\n", source="x")
    empty = TuneRecord(id="x/empty#1", abc="", source="x")
    dup = dataclasses.replace(first, id="x/dup#1")
    records = list(sample) + [garbage, two_voices, short, empty, dup]
    kept, report = corpus.clean(records, profile)
    assert report.n_in == len(records) == report.n_out + sum(report.dropped.values())
    assert report.is_balanced() and report.n_out == len(kept)
    assert report.dropped["multi_voice"] >= 1 and report.dropped["too_short"] >= 1
    assert report.dropped["no_abc"] == 1 and report.dropped["exact_duplicate"] >= 1
    assert any(k.startswith("unparsable: ") for k in report.dropped)
    ids = {r.id for r in kept}
    assert first.id in ids and "x/dup#1" not in ids and "x/garbage#1" not in ids
    # Kept tunes are normalised, parse, and carry their header facts.
    for r in kept:
        assert abc.validate(r.abc).ok and r.n_bars >= profile.min_bars and r.n_notes > 0
        assert r.key and r.meter and r.unit_length and r.family
    table = report.table()
    assert "exact_duplicate" in table and "ok" in table


def test_josquin_voices_are_dropped_counted(all_raw, profile):
    josquin = [r for r in all_raw if r.source == "josquin"]
    kept, report = corpus.clean(josquin, profile)
    # Unbarred voices of polyphony: most have no inner bar line at all; the rest have one
    # section line and then fail the "one complete bar" rule. None reaches training.
    assert kept == [] and report.is_balanced() and report.n_in == 29
    assert report.dropped["no_bar_lines"] >= 20
    assert set(report.dropped) <= {"no_bar_lines", "unparsable: no complete bar"}


def test_near_duplicates_share_a_family_and_are_kept(sample, profile):
    base = next(r for r in sample if r.source == "oneills1850" and corpus.clean([r], profile)[0])
    transposed = dataclasses.replace(base, id="x/transposed#1", abc=abc.transpose(base.abc, 3))
    # One note changed: still a near-duplicate.
    body_start = transposed.abc.index("\nK:") + 1
    body_start = transposed.abc.index("\n", body_start) + 1
    text = transposed.abc
    i = next(k for k in range(body_start, len(text)) if text[k] in "ABCDEFGabcdefg")
    variant = dataclasses.replace(base, id="x/variant#1",
                                  abc=text[:i] + ("c" if text[i] != "c" else "d") + text[i + 1:])
    other = next(r for r in sample if r.source == "essenFolksong")
    kept, report = corpus.clean([base, transposed, variant, other], profile)
    fam = {r.id: r.family for r in kept}
    assert len(kept) == 4  # near-duplicates are not dropped
    assert fam[base.id] == fam["x/transposed#1"] == fam["x/variant#1"] == base.id
    assert fam[other.id] == other.id
    assert report.n_families == 2 and report.n_near_duplicates == 2


# ------------------------------------------------------------------ splits
def test_split_is_deterministic_and_leak_free(sample, profile):
    kept, _ = corpus.clean(sample, profile)
    a = corpus.split_by_family(kept, profile)
    b = corpus.split_by_family(list(reversed(kept)), profile)
    assert {r.id: r.split for r in a} == {r.id: r.split for r in b}
    assert corpus.check_no_leakage(a) == {}
    counts = Counter(r.split for r in a)
    assert set(counts) == {"train", "validation", "test"} and counts["train"] > counts["test"]
    other_seed = corpus.split_by_family(kept, dataclasses.replace(profile, seed=1))
    assert {r.id: r.split for r in a} != {r.id: r.split for r in other_seed}
    # The checker does catch a family that straddles two splits.
    leaked = [dataclasses.replace(a[0], id="x/copy#1", split="test" if a[0].split != "test" else "train")]
    assert a[0].family in corpus.check_no_leakage(a + leaked)


def test_split_keeps_families_together(profile):
    recs = [TuneRecord(id=f"t#{i}", abc="", source="x", family=f"f{i // 3}") for i in range(60)]
    out = corpus.split_by_family(recs, profile)
    by_family = {}
    for r in out:
        by_family.setdefault(r.family, set()).add(r.split)
    assert all(len(s) == 1 for s in by_family.values())
    assert {r.split for r in out} == {"train", "validation", "test"}  # tiny corpus: none empty


# ------------------------------------------------------------------ augmentation
def test_augment_transpositions_train_only(sample, profile):
    kept, _ = corpus.clean(sample[:60], profile)
    recs = labels.label_tunes(corpus.split_by_family(kept, profile))
    counts = Counter()
    aug = corpus.augment_transpositions(recs, (-2, 0, 3), counts)
    n_train = sum(1 for r in recs if r.split == "train")
    assert counts["transposed"] + counts["transpose_failed"] == 2 * n_train
    assert len(aug) == counts["transposed"] > 0
    assert all(a.split == "train" and a.augmented_from for a in aug)
    assert all(abc.validate(a.abc).ok for a in aug)  # transposed copies are still valid ABC
    assert all("chords" not in a.labels for a in aug)  # refitted later, in the new key
    src = {r.id: r for r in recs}
    a = aug[0]
    assert a.id == f"{a.augmented_from}~t-2" and a.family == src[a.augmented_from].family
    assert abc.parse_key(a.key).fifths != abc.parse_key(src[a.augmented_from].key).fifths
    assert corpus.check_no_leakage(recs + aug) == {}


# ------------------------------------------------------------------ labels
def test_fit_chords_on_plain_triads():
    text = "X:1\nT:Triads\nM:4/4\nL:1/4\nK:C\nCEGc|FAcf|GBdg|cGEC|\n"
    assert [c for _, c in labels.fit_chords(text)] == ["C", "F", "G", "C"]
    minor = "X:1\nT:Minor\nM:3/4\nL:1/4\nK:Am\nAce|dfa|E^GB|A3|\n"
    assert [c for _, c in labels.fit_chords(minor)] == ["Am", "Dm", "E", "Am"]


def test_add_chord_symbols_reparses_with_one_chord_per_bar(sample, profile):
    kept, _ = corpus.clean(sample, profile)
    for r in kept[:80]:
        fitted = labels.fit_chords(r.abc, key=r.key)
        with_chords = labels.add_chord_symbols(r.abc, fitted)
        report = abc.validate(with_chords)
        assert report.ok, (r.id, report.error)
        # Same notes, same bars: chord symbols add no events and land one per fitted bar.
        assert [e.pitch for e in abc.events(with_chords)] == [e.pitch for e in abc.events(r.abc)]
        assert labels._given_chords(with_chords) == [c for _, c in fitted]


def test_add_chord_symbols_places_chord_before_decorations():
    text = 'X:1\nM:3/4\nL:1/8\nK:G\nD2|G2 ^F2 {a}G2|~B4 (3ABc|d6|]\n'
    out = labels.add_chord_symbols(text)
    assert abc.validate(out).ok
    assert re.search(r'\|"[A-G][#b]?m?"~B4', out), out
    assert out.splitlines()[-1].startswith('"')  # the pickup gets a chord too
    # Written chords: the symbol goes before the bracket, all notes count, endings stay intact.
    chords = labels.add_chord_symbols("X:1\nM:4/4\nL:1/4\nK:C\n[CEG]2 [CE]G|[FAc]4|[1 G2 B2:|[2 c4|]\n")
    assert chords.splitlines()[-1] == '"C"[CEG]2 [CE]G|"F"[FAc]4|[1 "G"G2 B2:|[2 "C"c4|]'


def test_tunes_with_chords_keep_them(all_raw):
    nottingham = next(r for r in all_raw if r.source == "nottingham-dataset")
    labelled = labels.label_record(nottingham)
    assert labelled.labels["chords"][:3] == ["D", "Em", "A"]
    assert labelled.labels["methods"]["chords"].startswith("given")
    assert labels.add_chord_symbols(nottingham.abc) == nottingham.abc


def test_labels_style_emotion_theme(sample, profile):
    kept, _ = corpus.clean(sample, profile)
    out = labels.label_tunes(kept)
    for r in out:
        for name in ("emotion", "style"):
            assert set(r.labels[name]) == {"en", "zh"} and r.labels[name]["zh"]
        assert set(r.labels["methods"]) >= {"chords", "emotion", "style", "theme"}
    han = [r for r in out if "/han" in r.file]
    assert han and all(r.labels["style"] == {"en": "chinese folk song", "zh": "中国民歌"} for r in han)
    reels = [r for r in out if r.labels["style"]["en"] == "reel"]
    assert reels and all(r.labels["pace"] == "fast" for r in reels if not r.tempo)
    assert labels.clean_title("Acacia -- Reel") == "Acacia"
    assert labels.clean_title("The Lads of the Village.") == "Lads of the Village"


def test_emotion_rules_follow_mode_and_pace():
    def emotion(key: str, meter: str, tempo: str, body: str) -> str:
        text = f"X:1\nT:t\nM:{meter}\nL:1/8\nQ:{tempo}\nK:{key}\n{body}\n"
        rec = TuneRecord(id="t#1", abc=text, source="x", key=key, meter=meter, tempo=tempo,
                         n_bars=4, n_notes=16)
        return labels.label_record(rec).labels["emotion"]["en"]

    body = "CDEF GABc|cBAG FEDC|CDEF GABc|c8|"
    assert emotion("C", "4/4", "1/4=140", body) == "joyful"
    assert emotion("Am", "4/4", "1/4=60", body) == "sad"
    # Q:3/8=80 is 120 quarter notes a minute: fast, and 6/8 is compound -> lively.
    assert emotion("C", "6/8", "3/8=80", "CDE FGA|Bcd cBA|GFE DCB,|C6|") == "lively"


# ------------------------------------------------------------------ hub / local datasets
def _write(path: Path, rows, jsonl: bool = False) -> Path:
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) if jsonl else json.dumps(rows, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")
    return path


def test_load_hub_dataset_local_schemas(tmp_path, all_raw):
    tune = all_raw[100].abc.strip()
    tune2 = all_raw[9000].abc.strip()
    irish = _write(tmp_path / "irishman.jsonl",
                   [{"abc notation": tune, "control code": "S:2\nB:8\nE:4\n"}, {"abc notation": tune2}], jsonl=True)
    recs = corpus.load_hub_dataset(irish)
    assert [r.abc.strip() for r in recs] == [tune, tune2]
    assert recs[0].labels["given"]["control_code"].startswith("S:2") and recs[0].source == "local:irishman.jsonl"

    sft = _write(tmp_path / "sft.json", [
        {"instruction": "Compose a reel.", "input": "", "output": f"Here it is:\n{tune}\nEnjoy."},
        {"instruction": "What is a fugue?", "input": "", "output": "A contrapuntal form."}])
    recs = corpus.load_hub_dataset(sft)
    assert recs[0].abc.strip().startswith("X:") and "K:" in recs[0].abc and "Enjoy" not in recs[0].abc
    assert recs[0].labels["given"]["prompt"] == "Compose a reel." and recs[1].abc == ""

    chat = _write(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "你是专业的音乐作曲家 IMelodist"},
        {"role": "user", "content": "写一首欢快的曲子"},
        {"role": "assistant", "content": tune2}]}], jsonl=True)
    assert corpus.load_hub_dataset(chat, schema="sft")[0].abc.strip() == tune2

    xtuner = _write(tmp_path / "imelodist_sft.json", [{"conversation": [
        {"system": "你是专业的音乐作曲家 IMelodist", "input": "请创作一首民歌", "output": tune}]}])
    recs = corpus.load_hub_dataset(xtuner)
    assert recs[0].abc.strip() == tune and recs[0].labels["given"]["prompt"] == "请创作一首民歌"

    # Everything loaded goes through clean; the row without ABC is counted, not lost.
    kept, report = corpus.clean(corpus.load_hub_dataset(sft), get_profile("cpu"))
    assert report.dropped.get("no_abc") == 1 and report.is_balanced()


def test_load_hub_dataset_save_to_disk_folder(tmp_path, all_raw):
    import datasets

    ds = datasets.Dataset.from_dict({"abc notation": [r.abc for r in all_raw[200:203]],
                                     "control code": ["S:1"] * 3})
    ds.save_to_disk(str(tmp_path / "irishman_copy"))
    recs = corpus.load_hub_dataset(tmp_path / "irishman_copy")
    assert len(recs) == 3 and recs[0].abc == all_raw[200].abc


def test_hub_id_offline_fails_fast_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(corpus.HubUnavailableError, match="save_to_disk") as err:
        corpus.load_hub_dataset("sander-wood/irishman")
    assert "local path" in str(err.value)
    # No HF_HUB_OFFLINE and no network (simulated, so a connected machine never downloads
    # 200k tunes here): fail at once instead of datasets' ~25 s of retries.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(corpus, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(corpus.HubUnavailableError, match="pass the local path"):
        corpus.load_hub_dataset("m-a-p/MusicPile-sft", limit=10)
    with pytest.raises(ValueError, match="unknown schema"):
        corpus.load_hub_dataset("sander-wood/irishman", schema="midi")
    with pytest.raises(FileNotFoundError, match="neither"):
        corpus.load_hub_dataset("no_such_dir_here")


# ------------------------------------------------------------------ whole pipeline
def test_assemble_corpus_is_byte_identical_and_counted(tmp_path, sample, profile):
    profile = dataclasses.replace(profile, transpositions=(2,), max_tunes=200)
    a = corpus.assemble_corpus(profile, progress=False, records=sample, out_dir=tmp_path / "a")
    b = corpus.assemble_corpus(profile, progress=False, records=list(sample), out_dir=tmp_path / "b")
    for name in ("tunes.jsonl", "manifest.json", "cleaning_report.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    m = a.manifest
    assert m["counts"]["selected"] == 200 and m["counts"]["loaded"] == len(sample)
    assert m["counts"]["total"] == len(a.records) == 200 + m["counts"]["augmented"]
    assert m["files"]["tunes.jsonl"]["sha256"] == corpus._sha256(a.paths["tunes"])
    assert a.report.is_balanced() and corpus.check_no_leakage(a.records) == {}
    assert all(r.split == "train" for r in a.records if r.augmented_from)
    assert all("chords" in r.labels for r in a.records)
    assert corpus.read_jsonl(a.paths["tunes"]) == a.records


def test_assemble_corpus_reuses_identical_build(tmp_path, profile):
    # A small source folder, so the cached path is exercised without the full corpus.
    folder = tmp_path / "src"
    folder.mkdir()
    tunes = corpus.load_music21_corpus(["ryansMammoth"], limit=40)
    (folder / "t.abc").write_text("\n\n".join(r.abc for r in tunes), encoding="utf-8")
    profile = dataclasses.replace(profile, corpus_sources=(str(folder),))
    first = corpus.assemble_corpus(profile, progress=False)
    assert "clean" in first.timings
    again = corpus.assemble_corpus(profile, progress=False)
    assert "cache" in again.timings and again.records == first.records
    assert again.report == first.report
    (folder / "t.abc").write_text("\n\n".join(r.abc for r in tunes[:30]), encoding="utf-8")
    changed = corpus.assemble_corpus(profile, progress=False)
    assert "clean" in changed.timings and changed.manifest["counts"]["loaded"] == 30


def test_plots_return_figures(sample, profile):
    import matplotlib

    matplotlib.use("Agg")
    kept, _ = corpus.clean(sample[:50], profile)
    recs = labels.label_tunes(corpus.split_by_family(kept, profile))
    fig = corpus.plot_corpus_overview(recs)
    assert len(fig.axes) == 8
    assert len(corpus.plot_label_balance(recs).axes) == 3


# ------------------------------------------------------------------ properties
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(families=st.lists(st.integers(0, 30), min_size=1, max_size=120),
       seed=st.integers(0, 5), val=st.floats(0.0, 0.3), test=st.floats(0.0, 0.3))
def test_split_property_no_leakage_and_deterministic(families, seed, val, test):
    profile = get_profile("cpu", seed=seed, val_fraction=val, test_fraction=test)
    recs = [TuneRecord(id=f"t#{i}", abc="", source="x", family=f"f{f}") for i, f in enumerate(families)]
    out = corpus.split_by_family(recs, profile)
    assert corpus.check_no_leakage(out) == {}
    assert [r.split for r in out] == [r.split for r in corpus.split_by_family(recs, profile)]
    assert {r.split for r in out} <= {"train", "validation", "test"}
    assert [r.id for r in out] == [r.id for r in recs]  # order and records preserved


@settings(max_examples=80, deadline=None)
@given(st.text(max_size=300))
def test_extract_abc_and_clean_title_never_crash_on_any_text(text):
    for tune in corpus.tunes_in_text(text):
        assert "K:" in tune
    assert isinstance(labels.clean_title(text), str)


def test_quarter_bpm():
    assert labels.quarter_bpm("1/4=120") == 120
    assert labels.quarter_bpm("3/8=80") == 120
    assert labels.quarter_bpm('"Allegro" 1/2=100') == 200
    assert labels.quarter_bpm("") is None and labels.quarter_bpm("fast") is None


def test_mode_from_final_note_when_k_is_only_a_signature(all_raw):
    assert labels.effective_mode("G", 64)[0] == "minor"  # K:G ending on E: E minor
    assert labels.effective_mode("C", 62)[0] == "dorian"
    assert labels.effective_mode("C", 60) == ("major", "K: field")
    assert labels.effective_mode("Am", 72) == ("minor", "K: field")  # an explicit mode is trusted
    # "Renmin gongshe shizai hao" (Essen han1 #1): K:C, ends on D -> shang mode, Dorian family.
    song = next(r for r in all_raw if r.id == "essenFolksong/han1.abc#1")
    kept, _ = corpus.clean([song], get_profile("cpu"))
    derived = labels.label_record(kept[0]).labels
    assert derived["mode"] == "dorian" and derived["chinese_mode"] == {"zh": "商调式", "en": "shang"}
    assert derived["methods"]["mode"].startswith("final note")


def test_local_jsonl_rows_keep_unicode_line_separators(tmp_path, all_raw):
    # U+0085 is what a cp1252 ellipsis (0x85) becomes through the Latin-1 fallback.
    tune = all_raw[100].abc.strip().replace("\nM:", "\nN:a\u2028b\u2029c\u0085d\nM:", 1)
    rows = _write(tmp_path / "irishman.jsonl", [{"abc notation": tune}, {"abc notation": "X:2"}], jsonl=True)
    recs = corpus.load_hub_dataset(rows)
    assert [r.abc.strip() for r in recs] == [tune, "X:2"]


def test_corpus_jsonl_reads_back_unicode_line_separators(tmp_path, all_raw):
    rec = dataclasses.replace(all_raw[0], title="a\u2028b\u2029c\u0085d")
    path = corpus.write_jsonl([rec, all_raw[1]], tmp_path / "tunes.jsonl")
    assert corpus.read_jsonl(path) == [rec, all_raw[1]]


# ------------------------------------------------------------------ one bad file or row is a counted drop
def test_an_unreadable_abc_file_is_a_counted_drop_not_an_abort(tmp_path, all_raw, caplog):
    folder = tmp_path / "tunes"
    folder.mkdir()
    (folder / "good.abc").write_text(all_raw[100].abc, encoding="utf-8")
    (folder / "gone.abc").symlink_to(tmp_path / "deleted.abc")  # a broken link
    (folder / "folder.abc").mkdir()  # rglob("*.abc") finds folders too
    (folder / "notes.abc").write_bytes(b"\x1f\x8b\x08 not a tune at all\n")  # no X:/K: field
    with caplog.at_level("WARNING", logger="imelodist_lib.corpus"):
        recs = corpus.load_abc_folder(folder)
    bad = {r.id: r.labels["load_error"] for r in recs if r.abc == ""}
    assert set(bad) == {"tunes/gone.abc#unreadable", "tunes/folder.abc#unreadable", "tunes/notes.abc#unreadable"}
    assert "FileNotFoundError" in bad["tunes/gone.abc#unreadable"]
    assert "IsADirectoryError" in bad["tunes/folder.abc#unreadable"]
    assert "no tune" in bad["tunes/notes.abc#unreadable"]
    assert "tunes/gone.abc#unreadable" in caplog.text
    kept, report = corpus.clean(recs, get_profile("cpu"))
    assert len(kept) == 1 and report.dropped["no_abc"] == 3 and report.is_balanced()


def test_an_unreadable_file_in_the_music21_corpus_is_a_counted_drop(tmp_path, all_raw, monkeypatch):
    (tmp_path / "coll").mkdir()
    (tmp_path / "coll" / "a.abc").write_text(all_raw[100].abc, encoding="utf-8")
    (tmp_path / "coll" / "b.abc").symlink_to(tmp_path / "deleted.abc")
    monkeypatch.setattr(corpus, "music21_corpus_dir", lambda: tmp_path)
    recs = corpus.load_music21_corpus(["coll"])
    assert [r.id for r in recs][-1] == "coll/b.abc#unreadable" and len(recs) == 2
    assert "FileNotFoundError" in recs[-1].labels["load_error"]


def test_bad_rows_of_a_local_dataset_are_counted_drops(tmp_path, all_raw):
    tune = all_raw[100].abc.strip()
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([json.dumps({"abc notation": tune}), '{"abc notation": "X:1\\nK:C', "[1, 2]",
                               json.dumps({"abc notation": 42}), json.dumps({"something": "else"}),
                               json.dumps({"abc notation": all_raw[9000].abc})]) + "\n", encoding="utf-8")
    recs = corpus.load_hub_dataset(path)
    assert len(recs) == 6 and [r.abc.strip() for r in recs if r.abc] == [tune, all_raw[9000].abc.strip()]
    causes = [r.labels["load_error"] for r in recs if not r.abc]
    assert "mixed.jsonl:2" in causes[0] and "not a JSON object" in causes[1]
    assert "int, not text" in causes[2] and "cannot tell the schema" in causes[3]
    kept, report = corpus.clean(recs, get_profile("cpu"))
    assert report.dropped["no_abc"] == 4 and report.is_balanced() and len(kept) == 2
    (tmp_path / "other").mkdir()  # a dataset wholly in an unknown schema is still a clear error
    _write(tmp_path / "other" / "rows.jsonl", [{"something": "else"}], jsonl=True)
    with pytest.raises(ValueError, match="cannot tell the schema"):
        corpus.load_hub_dataset(tmp_path / "other")
