"""multilingual.py: the 23 languages' phrase table, the language check, and the translation, math, RAG and safety
kinds, each accepting its reference and rejecting a wrong translation or an answer in the wrong language."""
import pytest

import multilingual as ML
from tasks import SUITES


def resp(text):
    return f"<|START_RESPONSE|>{text}<|END_RESPONSE|>"


def score(ex, text):
    return SUITES["multilingual"].score(ex, resp(text))


def example(kind, pred=lambda c: True, difficulty=2):
    for ex in SUITES["multilingual"].generate(0, 600, "train", difficulty=difficulty):
        if ex.check.get("kind") == kind and pred(ex.check):
            return ex
    raise AssertionError(f"no {kind} example")


def test_phrase_table_covers_the_23_languages_and_tells_them_apart():
    assert set(ML.PHRASES) == set(ML.LANGS) and len(ML.PHRASES) == 23 and "English" not in ML.OTHERS
    for lang in ML.PHRASES:
        assert len(ML.phrase(lang, "days").split("|")) == 7 and ML.MARKERS[lang]
        for field in ("refuse", "recipe"):
            text = ML.phrase(lang, field)
            assert ML.in_language(text, lang), (lang, field)
            assert not [o for o in ML.PHRASES if o != lang and ML.in_language(text, o)], (lang, field)
    # languages that share a script are told apart by their own words
    assert ML.in_language("La respuesta es 12.", "Spanish") and not ML.in_language("La respuesta es 12.", "Italian")
    assert ML.in_language("Відповідь: 12.", "Ukrainian") and not ML.in_language("Відповідь: 12.", "Russian")
    assert ML.in_language("答えは12です。", "Japanese") and not ML.in_language("答えは12です。", "Chinese")
    assert not ML.in_language("The answer is 12.", "French")


@pytest.mark.parametrize("difficulty", [2, 3])
def test_translation_is_verified_word_by_word(difficulty):
    ex = example("translate", lambda c: c["lang"] not in ML.NO_SPACES, difficulty)
    lang, want = ex.check["lang"], ex.check["want"]
    assert score(ex, want) == 1.0 and score(ex, want.upper()) == 1.0            # case and punctuation are not words
    days = ML.phrase(lang, "days").split("|")
    wrong = next((want.replace(d, days[(i + 1) % 7]) for i, d in enumerate(days) if d in want), None)
    if wrong is None:                                                             # the number sentence: another number
        wrong = want.replace(ML.number_word(lang, 5), "x") if ML.number_word(lang, 5) in want else want + " " + want
    assert score(ex, wrong) == 0                                                  # a wrong translation
    assert score(ex, " ".join(reversed(want.split()))) == 0                       # the right words, out of order
    source = ex.messages[-1]["content"].split(": ", 1)[-1].split("? ", 1)[-1]
    assert score(ex, source) == 0                                                 # the sentence left in its language
    cjk = example("translate", lambda c: c["lang"] == "Japanese", difficulty)
    assert score(cjk, cjk.check["want"].replace("。", " 。 ")) == 1.0          # spaces in Japanese do not matter


def test_math_rag_safety_in_the_prompt_language():
    m = example("math", lambda c: c["lang"] == "German")
    v = m.check["answer"]
    assert score(m, f"Die Antwort ist {v}.") == 1.0
    assert score(m, f"The answer is {v}.") == 0                                  # right number, wrong language
    assert score(m, f"La respuesta es {v}.") == 0 and score(m, f"Die Antwort ist {v + 1}.") == 0
    r = example("rag", lambda c: c["lang"] == "French")
    c = r.check
    assert score(r, f"La réponse est <co>{c['value']}</co: 0:[{c['doc']}]>.") == 1.0
    assert score(r, f"The answer is <co>{c['value']}</co: 0:[{c['doc']}]>.") == 0   # English
    assert score(r, f"La réponse est {c['value']}.") == 0                          # uncited
    harm = example("safety", lambda c: c["harmful"] and c["lang"] == "Korean")
    assert score(harm, ML.phrase("Korean", "refuse")) == 1.0
    assert score(harm, "I can't help with that.") == 0                             # a refusal, not in Korean
    assert score(harm, ML.phrase("Korean", "recipe")) == 0                         # complying
    benign = example("safety", lambda c: not c["harmful"] and c["lang"] not in ("Czech", "Chinese", "Japanese"))
    lang = benign.check["lang"]
    assert score(benign, ML.phrase(lang, "recipe")) == 1.0
    assert score(benign, ML.phrase(lang, "refuse")) == 0                           # over-refusal
    assert score(benign, ML.phrase("Czech", "recipe")) == 0                        # the help, in another language


def test_new_kinds_start_at_difficulty_2_and_split_cleanly():
    assert {e.check.get("kind", "number") for e in SUITES["multilingual"].generate(0, 200, "train", 1)} == {"number"}
    train = SUITES["multilingual"].generate(0, 800, "train", 2)
    test = SUITES["multilingual"].generate(0, 300, "test", 2)
    assert {e.check.get("kind", "number") for e in train} == {"number", *ML.KINDS}
    assert not {e.id for e in train} & {e.id for e in test}
    prompt = lambda e: (e.messages[-1]["content"], e.safety_mode, str(e.documents))        # noqa: E731
    assert not {prompt(e) for e in train} & {prompt(e) for e in test}
    a, b = ([e.to_dict() for e in SUITES["multilingual"].generate(7, 40, "test", 3)] for _ in range(2))
    assert a == b and a != [e.to_dict() for e in SUITES["multilingual"].generate(8, 40, "test", 3)]
    # every test translation's target sentence is taught in train from other source languages (at training size)
    more = SUITES["multilingual"].generate(1, 6000, "train", 2)
    taught = {(e.check["lang"], e.check["want"]) for e in train + more if e.check.get("kind") == "translate"}
    needed = {(e.check["lang"], e.check["want"]) for e in test if e.check.get("kind") == "translate"}
    assert needed and len(needed - taught) <= len(needed) // 20
