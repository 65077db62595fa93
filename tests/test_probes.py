"""The knowledge probe: held-out questions (none in any training record), scoring, and a run."""
import re

import pytest

from imelodist_lib import probes
from imelodist_lib.knowledge import load_knowledge, read_identity
from imelodist_lib.knowledge_chats import composer_values, knowledge_chats, load_templates, work_values


@pytest.fixture(scope="module")
def training_text():
    """Every text the training stages read about knowledge: pretraining documents, identity
    chats and the knowledge chats (questions and answers)."""
    parts = list(load_knowledge())
    parts += [p["question"] + "\n" + p["answer"] for p in read_identity()]
    parts += [m["content"] for r in knowledge_chats(rounds=1) for m in r["messages"][1:]]
    return "\n".join(parts)


def test_no_probe_question_occurs_in_training(training_text):
    items = probes.probe_items(per_kind=None)
    assert len(items) > 2000
    leaked = [i.question for i in items if i.question in training_text]
    assert not leaked, leaked[:5]
    # nor does the fixed wording of any probe template (its text outside the placeholders)
    t = probes.load_probe_templates()
    for kind in probes.TEMPLATE_KINDS:
        for lang in ("en", "zh"):
            for template in t[kind][lang]:
                for stem in re.split(r"《?\{[a-z_]+\}》?", template):
                    if len(stem.strip()) >= 8:
                        assert stem.strip() not in training_text, stem
    # and the training templates are a different set of questions
    train_q = {q for kind, forms in load_templates().items() if isinstance(forms, dict)
               for lang in forms.values() for q, _ in lang}
    assert not train_q & {q for lang in t["identity"].values() for q in lang}


def test_scoring_accepts_variants_and_rejects_misses():
    assert probes.is_right("我的名字是 imelodist。", ["IMelodist"])
    assert probes.is_right("他叫约翰 · 塞巴斯蒂安 · 巴赫", ["约翰·塞巴斯蒂安·巴赫"])
    assert probes.name_variants("Hua Yanjun (Abing)") == ("Hua Yanjun (Abing)", "Hua Yanjun")
    assert probes.is_right("That is Hua Yanjun.", probes.name_variants("Hua Yanjun (Abing)"))
    assert probes.name_variants("《茉莉花》") == ("茉莉花",)
    assert not probes.is_right("X:1\nT:Dui hua\nM:2/4\nK:G\nd2d2|", ["刘炽"])
    assert not probes.is_right("巴赫", ["约翰·塞巴斯蒂安·巴赫"])  # a surname alone is not the name


def test_probe_items_cover_every_category_in_both_languages():
    items = probes.probe_items(per_kind=3, seed=1)
    by = {(i.category, i.lang) for i in items}
    assert by == {(c, lang) for c in probes.CATEGORIES for lang in ("en", "zh")}
    assert sum(i.category == "composer_names" for i in items) == 2 * 2 * 3
    walshaw = [i for i in items if "Walshaw" in i.expect]
    assert len(walshaw) == 2


def test_knowledge_probe_runs_and_scores_with_intervals(tiny):
    model, tokenizer = tiny
    items = probes.probe_items(per_kind=1)
    result = probes.knowledge_probe(model, tokenizer, items=items, max_new_tokens=8)
    assert set(result.scores) == {*probes.CATEGORIES, probes.IDENTITY_LEAK}
    categories = [result.scores[c] for c in probes.CATEGORIES]
    assert sum(s.n for s in categories) == len(items) == len(result.answers)
    leak = result.scores[probes.IDENTITY_LEAK]
    assert leak.n == len(items) - result.scores["identity"].n
    assert leak.correct == sum(probes.is_right(r["answer"], ["IMelodist"]) for r in result.answers
                               if r["category"] != "identity")
    for s in categories:
        assert s.correct == sum(r["right"] for r in result.answers if r["category"] == s.category)
        assert 0.0 <= s.interval[0] <= s.accuracy <= s.interval[1] <= 1.0
    assert "| identity |" in result.table()
    # under the UTF-8 mask no answer holds a broken character, not even one the limit cut short
    assert not any("\ufffd" in r["answer"] for r in result.answers)
    figure = result.plot()
    bars = list(figure.axes[0].patches)
    assert len(bars) == len(result.scores)  # one bar per category, its height the accuracy in %
    assert [b.get_height() for b in bars] == [100 * s.accuracy for s in result.scores.values()]


def test_name_rounds_leave_out_the_name_chats_but_keep_identity():
    def named(rows: list[dict]) -> int:
        return sum(r["task"].split("/")[1].startswith(("composer_", "work_")) for r in rows)

    without = knowledge_chats(rounds=2, small_repeats=1, name_rounds=0)
    assert {r["task"].split("/")[1] for r in without} == {"identity", "abc_inventor", "abc_field"}
    once = knowledge_chats(rounds=2, small_repeats=1, name_rounds=1)
    every = knowledge_chats(rounds=2, small_repeats=1)
    assert named(without) == 0 and named(every) == 2 * named(once)
    # composers both ways, works both ways and "who composed", each in both languages
    assert named(once) == 2 * (2 * len(composer_values()) + 3 * len(work_values()))
    assert len(once) - named(once) == len(every) - named(every) == len(without)


def test_a_character_cut_short_by_the_token_limit_is_dropped_not_shown_broken():
    from transformers import AutoTokenizer

    from imelodist_lib.profiles import SHIPPED_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL_DIR)
    ids = tokenizer("我是 IMelodist，一个用 ABC 记谱法写旋律的作曲模型。", add_special_tokens=False)["input_ids"]
    # the byte-level tokenizer spells most Chinese characters in several tokens: cut inside one
    cuts = [n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd")]
    assert cuts, "expected a character spelled in more than one token"
    cut = ids[:cuts[-1]]
    assert probes.answer_text(tokenizer, cut) == tokenizer.decode(cut).rstrip("\ufffd").rstrip()
    assert "\ufffd" not in probes.answer_text(tokenizer, cut)
    assert probes.answer_text(tokenizer, cut, masked=False).endswith("\ufffd")  # unmasked: as decoded
    assert probes.answer_text(tokenizer, ids) == tokenizer.decode(ids)  # whole text untouched
