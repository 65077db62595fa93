"""The knowledge text continued pretraining reads: an ABC guide and music history (the .md
files of `data/knowledge/`), composer and work names zh<->en (composers.tsv, works.tsv, as
sentences) and IMelodist's identity dialogues (identity.jsonl). `load_knowledge` returns them
as documents; `instructions.build_datasets` puts them in the train split only.
"""
from __future__ import annotations

import csv
import random
import re
from pathlib import Path

from imelodist_lib import jsonl
from imelodist_lib.profiles import KNOWLEDGE_DIR

_NATIONALITY_ZH = {
    "german": "德国", "austrian": "奥地利", "french": "法国", "italian": "意大利", "russian": "俄罗斯",
    "english": "英国", "british": "英国", "polish": "波兰", "hungarian": "匈牙利", "czech": "捷克",
    "bohemian": "波希米亚", "norwegian": "挪威", "finnish": "芬兰", "spanish": "西班牙",
    "american": "美国", "chinese": "中国", "japanese": "日本", "dutch": "荷兰", "flemish": "佛兰德",
    "franco-flemish": "法兰德斯", "belgian": "比利时", "danish": "丹麦", "swedish": "瑞典",
    "irish": "爱尔兰", "scottish": "苏格兰", "brazilian": "巴西", "argentine": "阿根廷",
    "argentinian": "阿根廷", "armenian": "亚美尼亚", "estonian": "爱沙尼亚", "romanian": "罗马尼亚",
    "swiss": "瑞士", "mexican": "墨西哥", "canadian": "加拿大", "australian": "澳大利亚",
    "greek": "希腊", "georgian": "格鲁吉亚", "ukrainian": "乌克兰", "latvian": "拉脱维亚",
    "lithuanian": "立陶宛", "portuguese": "葡萄牙", "welsh": "威尔士", "cuban": "古巴",
    "soviet": "苏联", "korean": "韩国", "icelandic": "冰岛", "slovak": "斯洛伐克", "croatian": "克罗地亚",
    "german-british": "德裔英国", "russian-american": "俄裔美国", "austrian-american": "奥地利裔美国",
    "chinese-american": "美籍华裔", "french-american": "法裔美国", "chinese-french": "法籍华裔",
    "austro-hungarian": "奥匈帝国", "swiss-french": "瑞士裔法国",
}
_PERIOD_ZH = {
    "medieval": "中世纪", "renaissance": "文艺复兴", "baroque": "巴洛克", "classical": "古典主义",
    "romantic": "浪漫主义", "late romantic": "晚期浪漫主义", "early romantic": "早期浪漫主义",
    "modern": "现代", "20th century": "20世纪", "20th-century": "20世纪", "contemporary": "当代",
    "impressionist": "印象主义", "modernist": "现代主义", "minimalist": "简约主义",
    "nationalist": "民族乐派", "early modern": "近代", "classical/romantic": "古典至浪漫主义",
}
_FORM_ZH = {
    "symphony": "交响曲", "concerto": "协奏曲", "violin concerto": "小提琴协奏曲",
    "piano concerto": "钢琴协奏曲", "opera": "歌剧", "sonata": "奏鸣曲", "piano sonata": "钢琴奏鸣曲",
    "string quartet": "弦乐四重奏", "suite": "组曲", "ballet": "芭蕾舞剧", "oratorio": "清唱剧",
    "cantata": "康塔塔", "mass": "弥撒曲", "requiem": "安魂曲", "overture": "序曲", "song": "歌曲",
    "song cycle": "声乐套曲", "symphonic poem": "交响诗", "tone poem": "交响诗", "etude": "练习曲",
    "nocturne": "夜曲", "prelude": "前奏曲", "waltz": "圆舞曲", "march": "进行曲", "fugue": "赋格",
    "folk song": "民歌", "erhu solo": "二胡独奏曲", "pipa solo": "琵琶独奏曲",
    "guqin piece": "古琴曲", "piano piece": "钢琴曲", "chamber music": "室内乐", "rhapsody": "狂想曲",
    "variations": "变奏曲", "serenade": "小夜曲", "orchestral work": "管弦乐作品", "choral": "合唱作品",
    "orchestral piece": "管弦乐曲", "film score": "电影配乐", "concertante": "协奏性作品",
    "chinese ensemble": "民族器乐合奏曲", "lied": "艺术歌曲", "art song": "艺术歌曲",
    "folk song arrangement": "民歌改编曲", "folk song arrangements": "民歌改编曲",
    "film song": "电影歌曲", "concert overture": "音乐会序曲", "solo instrumental": "器乐独奏曲",
    "operetta": "轻歌剧", "opera excerpt": "歌剧选段", "violin piece": "小提琴曲",
    "violin sonata": "小提琴奏鸣曲", "tango": "探戈", "sacred vocal": "宗教声乐作品",
    "ragtime": "拉格泰姆", "piano suite": "钢琴组曲", "passion": "受难曲",
    "keyboard collection": "键盘曲集", "harp tune": "竖琴曲", "fiddle tune": "提琴曲", "dance": "舞曲",
    "concerto grosso": "大协奏曲", "theatre piece": "剧场作品", "symphonic suite": "交响组曲",
    "symphonic fairy tale": "交响童话", "suona solo": "唢呐独奏曲", "song symphony": "交响声乐套曲",
    "salon piece": "沙龙小品", "popular song": "流行歌曲", "pipe tune": "风笛曲",
    "piano collection": "钢琴曲集", "orchestral rhapsody": "管弦乐狂想曲", "opera-ballet": "歌剧芭蕾",
    "opera cycle": "系列歌剧", "musical": "音乐剧", "motet": "经文歌", "minimalist": "简约主义作品",
    "melodrama": "情节剧", "liturgical drama": "礼拜剧", "keyboard piece": "键盘曲", "jig": "吉格舞曲",
    "jazz standard": "爵士标准曲", "incidental music": "戏剧配乐", "guzheng solo": "古筝独奏曲",
    "guqin song": "琴歌", "guitar piece": "吉他曲", "fanfare": "号角曲", "experimental": "实验音乐作品",
    "erhu concerto": "二胡协奏曲", "consort music": "合奏曲", "carol": "颂歌", "anthem": "赞美歌",
    "chinese instrumental": "民族器乐曲", "cantonese music": "广东音乐",
}


def _zh_word(value: str, table: dict[str, str]) -> str:
    """English label -> Chinese where the table knows it (already-Chinese text passes through);
    a hyphenated nationality the table lacks reads "<first>裔<second>" (German-Polish -> 德国裔波兰)."""
    v = (value or "").strip()
    if v.lower() in table:
        return table[v.lower()]
    parts = v.lower().split("-")
    if table is _NATIONALITY_ZH and len(parts) == 2 and all(p in table for p in parts):
        return f"{table[parts[0]]}裔{table[parts[1]]}"
    return v


def read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in rows]


def _chunks(items: list[str], size: int) -> list[str]:
    return ["\n".join(items[i:i + size]) for i in range(0, len(items), size)]


def _with_article(phrase: str) -> str:
    """English indefinite article + phrase ("an Italian composer", "a German composer")."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _composer_sentences(row: dict[str, str], rng: random.Random) -> tuple[str, str]:
    en, zh = row.get("english", ""), row.get("chinese", "")
    born, died = row.get("born", ""), row.get("died", "")
    nat, period = row.get("nationality", ""), row.get("period", "")
    life_en = f"{born}–{died}" if died else f"born {born}"
    life_zh = f"{born}—{died}" if died else f"{born}年生"
    nat_zh, period_zh = _zh_word(nat, _NATIONALITY_ZH), _zh_word(period, _PERIOD_ZH)
    if period and not period_zh.endswith(("世纪", "当代", "现代")):
        period_zh += "时期"
    if not period:
        period_en = ""
    elif "century" in period.lower():
        period_en = f" of the {period}"
    else:
        period_en = f" of the {period} period"
    was = "was" if died else "is"
    composer = _with_article(f"{nat} composer" if nat else "composer")
    to_zh = rng.choice([
        f"{en} ({life_en}) {was} {composer}{period_en}. In Chinese the name is written {zh}.",
        f"The Chinese name of the {nat} composer {en} ({life_en}) is {zh}.",
        f"Q: How do you write {en} in Chinese? A: {zh} — {composer}{period_en} ({life_en}).",
        f"{en} → {zh} ({nat}, {life_en}{', ' + period if period else ''})",
    ])
    to_en = rng.choice([
        f"{zh}（{en}，{life_zh}）是{nat_zh}{period_zh}的作曲家。",
        f"{nat_zh}作曲家{zh}的英文名是 {en}（{life_zh}）。",
        f"问：{zh}的英文名怎么写？答：{en}。这位{nat_zh}作曲家属于{period_zh or '近代'}（{life_zh}）。",
        f"{zh} → {en}（{nat_zh}，{life_zh}{'，' + period_zh if period_zh else ''}）",
    ])
    return to_zh, to_en


def _work_sentences(row: dict[str, str], rng: random.Random) -> tuple[str, str]:
    en, zh = row.get("english", ""), row.get("chinese", "")
    c_en, c_zh = row.get("composer_english", ""), row.get("composer_chinese", "")
    year, form = row.get("year", ""), row.get("form", "")
    form_zh = _zh_word(form, _FORM_ZH)
    written = f"written in {year}" if year else "of unknown date"
    year_zh = f"于{year}年" if year else ""
    to_zh = rng.choice([
        f"{en} is {_with_article(form or 'work')} by {c_en}, {written}; its Chinese title is {zh}.",
        f"In Chinese, {c_en}'s {form or 'work'} {en} is called {zh}.",
        f"Q: What is the Chinese title of {en} by {c_en}? A: {zh} ({c_zh}).",
        f"{en} ({c_en}{', ' + year if year else ''}) → {zh}",
    ])
    to_en = rng.choice([
        f"《{zh}》是{c_zh}{year_zh}创作的{form_zh}，英文名为 {en}。",
        f"{c_zh}（{c_en}）的{form_zh}《{zh}》英文名是 {en}。",
        f"问：《{zh}》的英文名是什么？答：{en}，作曲者 {c_en}。",
        f"《{zh}》（{c_zh}{'，' + year if year else ''}） → {en}",
    ])
    return to_zh, to_en


def _markdown_sections(text: str) -> list[str]:
    """Split a guide at its level-1/level-2 headings; each section keeps its heading."""
    sections, current = [], []
    for line in text.splitlines():
        if re.match(r"#{1,2} ", line) and any(s.strip() for s in current):
            sections.append("\n".join(current).strip())
            current = []
        current.append(line)
    if any(s.strip() for s in current):
        sections.append("\n".join(current).strip())
    return [s for s in sections if len(s) > 40]  # a heading alone teaches nothing


def read_identity(knowledge_dir: Path = KNOWLEDGE_DIR) -> list[dict[str, str]]:
    """The identity Q&A pairs ({"lang","question","answer"}) from identity.jsonl."""
    path = Path(knowledge_dir) / "identity.jsonl"
    if not path.exists():
        return []
    pairs = []
    for n, row in enumerate(jsonl.read_jsonl(path), 1):
        if not {"lang", "question", "answer"} <= set(row):
            raise ValueError(f"{path}: row {n}: identity rows need lang, question and answer")
        pairs.append({"lang": row["lang"], "question": row["question"], "answer": row["answer"]})
    return pairs


def load_knowledge(knowledge_dir: Path | str = KNOWLEDGE_DIR) -> list[str]:
    """The knowledge folder as continued-pretraining documents: guide and history sections,
    composer and work names as zh<->en sentences both ways, identity Q&A as dialogue text."""
    folder = Path(knowledge_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"knowledge folder {folder} not found: it ships with the repo under "
                                "data/knowledge/ (restore it with git, or pass knowledge_dir=...)")
    docs: list[str] = []
    for md in sorted(folder.glob("*.md")):
        if md.name.lower() == "readme.md":
            continue
        docs.extend(_markdown_sections(md.read_text(encoding="utf-8")))
    for name, render in (("composers.tsv", _composer_sentences), ("works.tsv", _work_sentences)):
        path = folder / name
        if not path.exists():
            continue
        pairs = [render(row, random.Random(f"{name}/{i}")) for i, row in enumerate(read_tsv(path))]
        docs.extend(_chunks([p[0] for p in pairs], 10))
        docs.extend(_chunks([p[1] for p in pairs], 10))
    dialogue = []
    for pair in read_identity(folder):
        user, bot = ("用户", "IMelodist") if pair["lang"] == "zh" else ("User", "IMelodist")
        dialogue.append(f"{user}：{pair['question']}\n{bot}：{pair['answer']}" if pair["lang"] == "zh"
                        else f"{user}: {pair['question']}\n{bot}: {pair['answer']}")
    docs.extend("\n\n".join(dialogue[i:i + 6]) for i in range(0, len(dialogue), 6))
    if not docs:
        raise FileNotFoundError(f"knowledge folder {folder} holds no .md, .tsv or identity.jsonl files")
    return docs
