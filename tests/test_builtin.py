"""The built-in corpus: deterministic, correct answers, clean bilingual text, a usable answer checker."""

import re

import pytest

from minillm.data.builtin import (
    KINDS,
    WordProblem,
    builtin_corpus,
    check_answer,
    extract_answer,
    generate_stories,
    generate_word_problems,
    heldout_word_problems,
)

CJK = re.compile(r"[\u4e00-\u9fff]")
FULL_WIDTH_PUNCT = re.compile(r"[，。？：]")
ASCII_PUNCT = re.compile(r"[,.?:;!]")
STEP = re.compile(r"(\d+) ([-+*/×÷]) (\d+) = (\d+)")
KIND_SYMBOLS = {"add": [["+"]], "sub": [["-"]], "mul": [["*"]], "div": [["/"]], "two_step": [["+", "-"], ["*", "-"]]}
OBJECT_NOUNS = [("apple", "apples"), ("peach", "peaches"), ("candy", "candies"), ("leaf", "leaves"),
                ("bunny", "bunnies"), ("box", "boxes"), ("basket", "baskets"), ("toy car", "toy cars")]


def _evaluate(x: int, symbol: str, y: int) -> int:
    if symbol in "/÷":
        assert x % y == 0, f"{x} / {y} is not exact"
        return x // y
    return {"+": x + y, "-": x - y, "*": x * y, "×": x * y}[symbol]


@pytest.fixture(scope="module")
def problems() -> list[WordProblem]:
    return generate_word_problems(2000, seed=1)


def test_same_seed_same_output_and_different_seed_different_output():
    assert generate_word_problems(50, seed=7) == generate_word_problems(50, seed=7)
    assert generate_stories(50, seed=7) == generate_stories(50, seed=7)
    assert builtin_corpus(100, seed=7) == builtin_corpus(100, seed=7)
    assert generate_word_problems(50, seed=7) != generate_word_problems(50, seed=8)
    assert generate_stories(50, seed=7) != generate_stories(50, seed=8)
    assert builtin_corpus(100, seed=7) != builtin_corpus(100, seed=8)
    assert generate_word_problems(20, seed=7) == generate_word_problems(50, seed=7)[:20]


def test_every_answer_is_correct(problems):
    """Re-derive each answer from the question's own numbers with the kind's operations."""
    assert {p.kind for p in problems} == set(KINDS)
    assert {p.lang for p in problems} == {"zh", "en"}
    for p in problems:
        steps = STEP.findall(p.solution)
        symbols = [s.replace("×", "*").replace("÷", "/") for _, s, _, _ in steps]
        assert symbols in KIND_SYMBOLS[p.kind], p
        operands = [int(steps[0][0])] + [int(y) for _, _, y, _ in steps]
        assert sorted(operands) == sorted(int(n) for n in re.findall(r"\d+", p.question)), p
        value = operands[0]
        for (x, symbol, y, result), operand in zip(steps, operands[1:]):
            assert int(x) == value and int(y) == operand, p
            value = _evaluate(value, symbol, operand)
            assert int(result) == value, p
        assert isinstance(p.answer, int) and p.answer == value >= 0, p
        assert extract_answer(p.solution) == p.answer


def test_solution_format(problems):
    for p in problems:
        ending = f"答案：{p.answer}" if p.lang == "zh" else f"The answer is {p.answer}."
        assert p.solution.endswith(ending)
        assert p.text() == f"{p.question}\n{p.solution}"


def test_measure_words_agree_with_objects():
    questions = [p.question for p in generate_word_problems(500, seed=2, lang="zh")]
    for measure, noun in [("个", "苹果"), ("支", "铅笔"), ("本", "书"), ("朵", "花"), ("只", "小猫")]:
        assert any(re.search(rf"\d+{measure}{noun}", q) for q in questions), noun
        for q in questions:
            assert not re.search(rf"\d+[个支本朵只张块颗辆把顶片条](?<!{measure}){noun}", q), q


def test_check_answer_accepts_own_solution_and_rejects_wrong_number(problems):
    for p in problems[:200]:
        assert check_answer(p, p.solution)
        wrong = p.solution.rsplit(str(p.answer), 1)
        assert not check_answer(p, str(p.answer + 1).join(wrong))
    assert check_answer(8, "答案：8") and not check_answer(8, "no idea")


@pytest.mark.parametrize("response, expected", [
    ("答案：８", 8),
    ("The answer is -3.", -3),
    ("so 12 apples", 12),
    ("no number", None),
    ("3 + 5 = 8。答案：8", 8),
    ("答案: 7，不是 9", 7),
    ("THE ANSWER IS 4, since 2 + 2 = 4 and not 5", 4),
    ("10-3 = 7", 7),
    ("答案是 2.5", None),
    ("－４ degrees", -4),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_chinese_text_is_chinese_and_english_text_is_ascii():
    zh = [p.text() for p in generate_word_problems(300, seed=3, lang="zh")] + generate_stories(300, seed=3, lang="zh")
    en = [p.text() for p in generate_word_problems(300, seed=3, lang="en")] + generate_stories(300, seed=3, lang="en")
    for doc in zh:
        assert CJK.search(doc) and FULL_WIDTH_PUNCT.search(doc) and not ASCII_PUNCT.search(doc), doc
    for doc in en:
        assert doc.isascii() and not CJK.search(doc), doc


def test_english_plurals_agree_with_numbers():
    texts = [p.question for p in generate_word_problems(2000, seed=4, lang="en")]
    for singular, plural in OBJECT_NOUNS:
        for text in texts:
            assert not re.search(rf"\b1 {plural}\b", text), text
            assert not re.search(rf"\b(?!1\b)\d+ {singular}\b", text), text
    assert any(re.search(r"\b1 [a-z]+\b", t) for t in texts)


def test_stories_are_short_and_about_one_character():
    for story in generate_stories(200, seed=5, lang="en"):
        sentences = re.findall(r"[^.!?]+[.!?]", story)
        assert 3 <= len(sentences) <= 6, story
        protagonist = re.search(r"([A-Z][a-z]+)(?: went| was a| and (?:his|her) mom|'s first)", story).group(1)
        assert sum(protagonist in s for s in sentences) >= len(sentences) - 2, story
    for story in generate_stories(200, seed=5, lang="zh"):
        assert 3 <= story.count("。") <= 6, story


def test_builtin_corpus_size_mix_and_variety():
    docs = builtin_corpus(2000, seed=0, problem_fraction=0.3)
    assert len(docs) == 2000
    n_problems = sum(("答案：" in d) or ("The answer is" in d) for d in docs)
    assert n_problems == 600
    assert len(set(docs)) >= 0.9 * len(docs)
    assert any(CJK.search(d) for d in docs) and any(d.isascii() for d in docs)
    assert builtin_corpus(0) == []
    assert len(builtin_corpus(7, problem_fraction=1.0)) == 7


def test_heldout_problems_rarely_overlap_training_problems():
    train = {p.question for p in generate_word_problems(5000, seed=0)}
    heldout = heldout_word_problems(200)
    overlap = sum(p.question in train for p in heldout) / len(heldout)
    print(f"held-out overlap with seed-0 training questions: {overlap:.1%}")
    assert overlap < 0.2
    assert heldout == heldout_word_problems(200)


@pytest.mark.parametrize("call, name", [
    (lambda: generate_word_problems(-1), "n"),
    (lambda: generate_word_problems(5, lang="fr"), "lang"),
    (lambda: generate_word_problems(5, max_value=1), "max_value"),
    (lambda: generate_stories(-2), "n"),
    (lambda: generate_stories(2, lang="zh-TW"), "lang"),
    (lambda: builtin_corpus(-1), "n_documents"),
    (lambda: builtin_corpus(10, problem_fraction=1.5), "problem_fraction"),
    (lambda: builtin_corpus(10, problem_fraction=-0.1), "problem_fraction"),
    (lambda: builtin_corpus(10, seed=10_000_019), "seed"),
    (lambda: heldout_word_problems(3, lang="de"), "lang"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()
