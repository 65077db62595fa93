"""The music-knowledge files in data/knowledge/: formats the loader relies on, plausible facts,
and every ```abc example in the guides parsing (music21) and holding full bars (our checker)."""
from __future__ import annotations

import csv
import json
import re
from fractions import Fraction

import pytest

from imelodist_lib.profiles import KNOWLEDGE_DIR

COMPOSER_COLUMNS = ["english", "chinese", "born", "died", "nationality", "period"]
WORK_COLUMNS = ["english", "chinese", "composer_english", "composer_chinese", "year", "form"]
PERIODS = {"medieval", "renaissance", "baroque", "classical", "romantic", "20th century",
           "contemporary"}
LATEST_YEAR = 2026
GUIDES = ["abc_notation_guide.md", "abc_notation_guide_zh.md"]
HISTORIES = ["music_history.md", "music_history_zh.md"]
CJK = re.compile(r"[\u4e00-\u9fff]")
ABC_BLOCK = re.compile(r"^```abc\n(.*?)^```", re.S | re.M)


def read_tsv(name: str, columns: list[str]) -> list[dict[str, str]]:
    """Rows of a knowledge TSV as dicts; fails on a wrong header or a short/long row."""
    path = KNOWLEDGE_DIR / name
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows[0] == columns, f"{name}: header {rows[0]} != {columns}"
    for n, row in enumerate(rows[1:], start=2):
        assert len(row) == len(columns), f"{name} line {n}: {len(row)} fields, want {len(columns)}"
        for col, value in zip(columns, row):
            assert value == value.strip(), f"{name} line {n}: stray spaces in {col}"
    return [dict(zip(columns, row)) for row in rows[1:]]


COMPOSERS = read_tsv("composers.tsv", COMPOSER_COLUMNS)
WORKS = read_tsv("works.tsv", WORK_COLUMNS)


def abc_blocks(name: str) -> list[str]:
    """The ```abc fenced examples of a guide, in order."""
    return ABC_BLOCK.findall((KNOWLEDGE_DIR / name).read_text(encoding="utf-8"))


GUIDE_EXAMPLES = [(g, i, block) for g in GUIDES for i, block in enumerate(abc_blocks(g))]
EXAMPLE_IDS = [f"{g.removesuffix('.md')}-{i + 1}" for g, i, _ in GUIDE_EXAMPLES]


# ----------------------------------------------------------------------------- composers
def test_composers_count_and_required_columns():
    assert len(COMPOSERS) >= 150
    for row in COMPOSERS:
        for col in ("english", "chinese", "born", "nationality", "period"):
            assert row[col], f"{row['english']!r}: empty {col}"
        assert row["period"] in PERIODS, row
        assert CJK.search(row["chinese"]), f"{row['english']}: Chinese name has no Chinese"


def test_composer_names_unique():
    for col in ("english", "chinese"):
        names = [r[col] for r in COMPOSERS]
        dupes = sorted({n for n in names if names.count(n) > 1})
        assert not dupes, f"duplicate composer {col} names: {dupes}"


def test_composer_years_plausible():
    for r in COMPOSERS:
        born = int(r["born"])
        assert 900 <= born <= LATEST_YEAR - 15, r
        if r["died"]:
            died = int(r["died"])
            assert born < died <= LATEST_YEAR, r
            assert died - born <= 110, r
        else:  # living: nobody born before 1920 is still alive
            assert born >= 1920, f"{r['english']}: no death year but born {born}"


def test_composers_cover_chinese_and_western_canon():
    chinese = {r["chinese"] for r in COMPOSERS}
    english = {r["english"] for r in COMPOSERS}
    for name in ("冼星海", "聂耳", "刘天华", "阿炳（华彦钧）", "何占豪", "陈钢", "谭盾"):
        assert name in chinese, name
    for name in ("Johann Sebastian Bach", "Wolfgang Amadeus Mozart", "Ludwig van Beethoven",
                 "Frédéric Chopin", "Pyotr Ilyich Tchaikovsky", "Turlough O'Carolan"):
        assert name in english, name
    bach = next(r for r in COMPOSERS if r["english"] == "Johann Sebastian Bach")
    assert (bach["chinese"], bach["born"], bach["died"]) == ("约翰·塞巴斯蒂安·巴赫", "1685", "1750")
    assert sum(r["nationality"].startswith("Chinese") for r in COMPOSERS) >= 30


# ----------------------------------------------------------------------------- works
def test_works_count_and_required_columns():
    assert len(WORKS) >= 150
    for row in WORKS:
        for col in ("english", "chinese", "composer_english", "composer_chinese", "form"):
            assert row[col], f"{row['english']!r}: empty {col}"
        assert CJK.search(row["chinese"]), row


def test_work_names_unique_per_composer():
    for col in ("english", "chinese"):
        keys = [(r[col], r["composer_english"]) for r in WORKS]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        assert not dupes, f"duplicate works ({col}, composer): {dupes}"


def test_work_composers_are_listed_with_the_same_chinese_name():
    chinese_of = {r["english"]: r["chinese"] for r in COMPOSERS}
    for w in WORKS:
        english = w["composer_english"].split(" & ")
        chinese = w["composer_chinese"].split("、")
        assert len(english) == len(chinese), w
        for e, z in zip(english, chinese):
            if e == "Traditional":
                assert z == "传统", w
                continue
            assert e in chinese_of, f"{w['english']}: composer {e!r} not in composers.tsv"
            assert chinese_of[e] == z, f"{w['english']}: {z!r} != composers.tsv {chinese_of[e]!r}"


def test_work_years_fall_within_the_composers_lives():
    life = {r["english"]: (int(r["born"]), int(r["died"]) if r["died"] else LATEST_YEAR)
            for r in COMPOSERS}
    for w in WORKS:
        if not w["year"]:
            continue
        year = int(w["year"])
        assert 800 <= year <= LATEST_YEAR, w
        for name in w["composer_english"].split(" & "):
            if name == "Traditional":
                continue
            born, died = life[name]
            # Turandot (1926) premiered two years after Puccini died: allow posthumous dates
            assert born + 5 <= year <= died + 5, f"{w['english']} ({year}) vs {name} {born}-{died}"


def test_works_include_the_chinese_repertoire():
    names = {(w["chinese"], w["english"]) for w in WORKS}
    for pair in [("梁祝小提琴协奏曲", "The Butterfly Lovers Violin Concerto"),
                 ("二泉映月", "The Moon Reflected on the Second Spring"),
                 ("黄河大合唱", "Yellow River Cantata"), ("茉莉花", "Jasmine Flower"),
                 ("春江花月夜", "A Moonlit Night on the Spring River")]:
        assert pair in names, pair
    ninth = next(w for w in WORKS if w["english"] == 'Symphony No. 9 in D minor "Choral"')
    assert (ninth["chinese"], ninth["composer_english"], ninth["year"]) == \
        ("d小调第九交响曲“合唱”", "Ludwig van Beethoven", "1824")


# ----------------------------------------------------------------------------- identity
def test_identity_pairs():
    lines = (KNOWLEDGE_DIR / "identity.jsonl").read_text(encoding="utf-8").splitlines()
    pairs = [json.loads(line) for line in lines if line.strip()]
    assert len(pairs) >= 40
    for p in pairs:
        assert set(p) == {"lang", "question", "answer"}, p
        assert p["lang"] in ("zh", "en"), p
        assert p["question"].strip() and len(p["answer"]) >= 10, p
        text = p["question"] + p["answer"]
        if p["lang"] == "zh":
            assert CJK.search(p["question"]) and CJK.search(p["answer"]), p
        else:  # English pairs may quote a Chinese name, but are written in English
            assert len(CJK.findall(text)) < 0.1 * len(text), p
    by_lang = {lang: [p for p in pairs if p["lang"] == lang] for lang in ("zh", "en")}
    assert len(by_lang["zh"]) >= 20 and len(by_lang["en"]) >= 20
    questions = [p["question"] for p in pairs]
    assert len(set(questions)) == len(questions), "duplicate questions"
    for lang in ("zh", "en"):  # the model's name and base model are stated in both languages
        text = " ".join(p["answer"] for p in by_lang[lang])
        assert "IMelodist" in text and "InternLM2" in text and "IMelodist-tiny" in text


# ----------------------------------------------------------------------------- guides, history
def test_readme_describes_every_file_and_the_licence():
    readme = (KNOWLEDGE_DIR / "README.md").read_text(encoding="utf-8")
    assert "CC BY 4.0" in readme
    for name in GUIDES + HISTORIES + ["composers.tsv", "works.tsv", "identity.jsonl"]:
        assert (KNOWLEDGE_DIR / name).is_file(), name
        assert f"`{name}`" in readme, name


@pytest.mark.parametrize("guide", GUIDES)
def test_guides_cover_the_notation(guide):
    text = (KNOWLEDGE_DIR / guide).read_text(encoding="utf-8")
    assert len(abc_blocks(guide)) >= 15
    for token in ("X:", "T:", "C:", "O:", "R:", "M:", "L:", "Q:", "K:", "P:", "V:", "w:",
                  "K:Edor", "(3", "[CEG]", "{g}", "|:", ":|", "[1", "~", '"Am"', "^", "_", "="):
        assert token in text, f"{guide} never mentions {token!r}"


@pytest.mark.parametrize("guide", HISTORIES)
def test_history_is_substantial(guide):
    text = (KNOWLEDGE_DIR / guide).read_text(encoding="utf-8")
    size = len(CJK.findall(text)) if guide.endswith("_zh.md") else len(text.split())
    assert size >= 2500, f"{guide}: only {size} words/characters"
    for name in ("Bach", "Beethoven", "Monteverdi", "Debussy") if "zh" not in guide else \
            ("巴赫", "贝多芬", "蒙特威尔第", "德彪西"):
        assert name in text
    for topic in (("Ireland", "Scotland", "German", "guqin", "erhu", "pipa")
                  if "zh" not in guide else ("爱尔兰", "苏格兰", "德国", "古琴", "二胡", "琵琶")):
        assert topic in text, f"{guide} never mentions {topic}"


def music21_bar_problems(block: str) -> list[str]:
    """Bars that music21 measures as over-full, or short where no pickup/section end explains it.

    music21 splits an over-full ABC bar into a full measure plus a short one, so a short measure
    in the middle of a section is the sign of a wrong bar length.
    """
    import music21

    score = music21.converter.parse(block, format="abc")
    assert list(score.recurse().notes), "music21 found no notes"
    bar = Fraction(score.recurse().getElementsByClass("TimeSignature").first()
                   .barDuration.quarterLength)
    problems = []
    for part in (score.parts or [score]):
        measures = list(part.getElementsByClass("Measure"))
        for i, m in enumerate(measures):
            length = Fraction(m.duration.quarterLength)
            at_section_edge = (i in (0, len(measures) - 1) or m.leftBarline is not None
                               or m.rightBarline is not None
                               or measures[i - 1].rightBarline is not None)
            if length > bar or (length < bar and not at_section_edge):
                problems.append(f"bar {i + 1} lasts {length} quarter lengths, not {bar}")
    return problems


def test_music21_bar_check_catches_a_wrong_bar():
    good = "X:1\nT:t\nM:4/4\nL:1/8\nK:G\nGABc d2 B2 | c2 A2 B2 G2 | ABcd e2 d2 | cBAF G4 |]\n"
    assert music21_bar_problems(good) == []
    assert music21_bar_problems(good.replace("B2 G2 |", "B2 G2 d |"))


@pytest.mark.parametrize("guide,index,block", GUIDE_EXAMPLES, ids=EXAMPLE_IDS)
def test_guide_example_parses_with_music21(guide, index, block):
    pytest.importorskip("music21")
    if re.search(r"\[M:|^M:", block.split("\nK:", 1)[1], re.M):
        # music21 ignores a meter change inside the body: it can only vouch the tune parses
        import music21
        assert list(music21.converter.parse(block, format="abc").recurse().notes)
        return
    assert music21_bar_problems(block) == [], f"{guide} example {index + 1}"


@pytest.mark.parametrize("guide,index,block", GUIDE_EXAMPLES, ids=EXAMPLE_IDS)
def test_guide_example_passes_the_validator(guide, index, block):
    abc = pytest.importorskip("imelodist_lib.abc")
    report = abc.validate(block)
    assert report.ok, f"{guide} example {index + 1}: {report.error}"
    assert not report.bars.errors, [e.message for e in report.bars.errors]


def test_both_guides_show_the_same_number_of_examples():
    assert len(abc_blocks(GUIDES[0])) == len(abc_blocks(GUIDES[1]))
