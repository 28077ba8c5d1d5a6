"""The built-in corpus: procedural bilingual stories and arithmetic word problems.

Everything offline starts here: the quickstart pretrains on `builtin_corpus`, and the later stages
derive SFT conversations, preference pairs (right vs wrong answer) and RL prompts from
`generate_word_problems`, scoring answers with `check_answer`. The text is generated from small
template tables with `random.Random(seed)`, so it is deterministic, needs no files, and is regular
enough that a tiny model visibly learns it.

Held-out convention: `heldout_word_problems` uses `HELDOUT_SEED`; training data must never be
generated with that seed (`builtin_corpus` refuses it). Generation is sequential, so the first k
items of `generate_word_problems(n, seed)` are `generate_word_problems(k, seed)`.
"""

from __future__ import annotations

import operator
import random
import re
from dataclasses import dataclass
from typing import NamedTuple

from minillm.data.formats import Conversation, LabelledSequence, Message, PreferencePair

LANGS = ("zh", "en", "both")
KINDS = ("add", "sub", "mul", "div", "two_step")
HELDOUT_SEED = 10_000_019


class _Item(NamedTuple):
    measure: str  # Chinese measure word that agrees with the noun
    zh: str
    en: str
    en_plural: str
    animal: bool = False  # animals are fine to give away in a problem, odd to keep in a bag in a story


_ITEMS = (
    _Item("个", "苹果", "apple", "apples"), _Item("个", "橘子", "orange", "oranges"),
    _Item("个", "桃子", "peach", "peaches"), _Item("个", "梨", "pear", "pears"),
    _Item("块", "糖", "candy", "candies"), _Item("块", "饼干", "cookie", "cookies"),
    _Item("块", "橡皮", "eraser", "erasers"), _Item("支", "铅笔", "pencil", "pencils"),
    _Item("支", "蜡笔", "crayon", "crayons"), _Item("本", "书", "book", "books"),
    _Item("本", "笔记本", "notebook", "notebooks"), _Item("朵", "花", "flower", "flowers"),
    _Item("张", "贴纸", "sticker", "stickers"), _Item("张", "卡片", "card", "cards"),
    _Item("颗", "弹珠", "marble", "marbles"), _Item("个", "气球", "balloon", "balloons"),
    _Item("个", "鸡蛋", "egg", "eggs"), _Item("辆", "玩具车", "toy car", "toy cars"),
    _Item("把", "尺子", "ruler", "rulers"), _Item("顶", "帽子", "hat", "hats"),
    _Item("片", "树叶", "leaf", "leaves"), _Item("只", "小猫", "kitten", "kittens", True),
    _Item("只", "小鸭子", "duckling", "ducklings", True), _Item("条", "金鱼", "goldfish", "goldfish", True),
    _Item("只", "小兔子", "bunny", "bunnies", True), _Item("只", "小鸡", "chick", "chicks", True),
)
_STORY_ITEMS = tuple(item for item in _ITEMS if not item.animal)
# (Chinese noun, Chinese measure word, English singular, English plural)
_CONTAINERS = (("盒子", "盒", "box", "boxes"), ("袋子", "袋", "bag", "bags"),
               ("篮子", "篮", "basket", "baskets"), ("盘子", "盘", "plate", "plates"))
_NAMES = {  # (name, "m" | "f"): the gender picks the pronoun in stories
    "zh": (("小明", "m"), ("小红", "f"), ("李华", "m"), ("王芳", "f"), ("张伟", "m"), ("刘洋", "m"),
           ("陈静", "f"), ("小刚", "m"), ("小丽", "f"), ("赵磊", "m"), ("孙悦", "f"), ("周杰", "m"),
           ("吴敏", "f"), ("郑浩", "m"), ("小美", "f"), ("林琳", "f"), ("黄涛", "m"), ("杨帆", "m"),
           ("何佳", "f"), ("马晓东", "m"), ("朱婷", "f"), ("胡斌", "m"), ("高兰", "f"), ("罗阳", "m")),
    "en": (("Tom", "m"), ("Lily", "f"), ("Amy", "f"), ("Ben", "m"), ("Sam", "m"), ("Emma", "f"),
           ("Jack", "m"), ("Lucy", "f"), ("Mia", "f"), ("Noah", "m"), ("Olivia", "f"), ("Leo", "m"),
           ("Grace", "f"), ("Henry", "m"), ("Zoe", "f"), ("Max", "m"), ("Anna", "f"), ("David", "m"),
           ("Kate", "f"), ("Ryan", "m"), ("Ella", "f"), ("Oscar", "m"), ("Ruby", "f"), ("Daniel", "m")),
}
_PROBLEM_PLACES = (("教室", "the classroom"), ("花园", "the garden"), ("公园", "the park"),
                   ("商店", "the shop"), ("图书馆", "the library"), ("厨房", "the kitchen"))

# Word-problem templates keyed by the operations applied left to right to the numbers a, b (, c).
# zh fields: {m} measure word, {obj} noun, {box}/{box_m} container; en fields: {items} plural,
# {a_items} "3 apples" / "1 apple", {b_boxes}, ... with number agreement.
_ZH_PROBLEMS = {
    "+": ("{name}有{a}{m}{obj}，又买了{b}{m}，现在一共有多少{m}{obj}？",
          "{name}有{a}{m}{obj}，{name2}有{b}{m}{obj}，两人一共有多少{m}{obj}？",
          "{place}里有{a}{m}{obj}，{name}又拿来了{b}{m}，现在{place}里有多少{m}{obj}？",
          "{name}上午得到{a}{m}{obj}，下午又得到{b}{m}，今天一共得到几{m}{obj}？"),
    "-": ("{name}有{a}{m}{obj}，送给{name2}{b}{m}，还剩多少{m}{obj}？",
          "{place}里有{a}{m}{obj}，{name}拿走了{b}{m}，{place}里还有几{m}{obj}？",
          "{name}有{a}{m}{obj}，{name2}有{b}{m}{obj}，{name}比{name2}多几{m}？",
          "{name}买了{a}{m}{obj}，路上弄丢了{b}{m}，还剩几{m}{obj}？"),
    "*": ("有{a}个{box}，每个{box}里有{b}{m}{obj}，一共有多少{m}{obj}？",
          "{name}每天买{b}{m}{obj}，连续买了{a}天，一共买了多少{m}{obj}？",
          "{name}有{a}个{box}，每个{box}里装着{b}{m}{obj}，{name}一共有几{m}{obj}？",
          "{place}里的{obj}摆成{a}排，每排{b}{m}，一共有多少{m}{obj}？"),
    "/": ("{name}有{a}{m}{obj}，平均分给{b}个小朋友，每个小朋友分到几{m}？",
          "{name}把{a}{m}{obj}平均放进{b}个{box}里，每个{box}里放几{m}？",
          "{name}要把{a}{m}{obj}装进{box}，每个{box}装{b}{m}，需要几个{box}？"),
    "+-": ("{name}有{a}{m}{obj}，又买了{b}{m}，然后送给{name2}{c}{m}，现在还有多少{m}{obj}？",
           "{place}里原来有{a}{m}{obj}，{name}拿来{b}{m}，{name2}拿走{c}{m}，现在{place}里有几{m}{obj}？"),
    "*-": ("{name}买了{a}{box_m}{obj}，每{box_m}{b}{m}，送给{name2}{c}{m}，还剩多少{m}{obj}？",
           "有{a}个{box}，每个{box}里有{b}{m}{obj}，{name}拿走了{c}{m}，还剩多少{m}{obj}？"),
}
_EN_PROBLEMS = {
    "+": ("{name} has {a_items}. {name} buys {b} more. How many {items} does {name} have now?",
          "{name} has {a_items} and {name2} has {b_items}. How many {items} do they have in total?",
          "There are {a_items} in {place}. {name} brings {b} more. How many {items} are in {place} now?",
          "{name} got {a_items} in the morning and {b_items} in the afternoon. "
          "How many {items} did {name} get today?"),
    "-": ("{name} has {a_items}. {name} gives {b_items} to {name2}. How many {items} does {name} have left?",
          "There are {a_items} in {place}. {name} takes {b} away. How many {items} are left in {place}?",
          "{name} has {a_items} and {name2} has {b_items}. How many more {items} does {name} have than {name2}?",
          "{name} bought {a_items} but lost {b} on the way home. How many {items} does {name} have now?"),
    "*": ("There are {a_boxes} with {b_items} in each {box}. How many {items} are there in total?",
          "{name} buys {b_items} every day for {a} days. How many {items} does {name} buy in total?",
          "{name} has {a_boxes}, and each {box} holds {b_items}. How many {items} does {name} have?",
          "The {items} in {place} stand in {a} rows of {b}. How many {items} are there?"),
    "/": ("{name} has {a_items} and shares them equally among {b} friends. How many {items} does each friend get?",
          "{name} puts {a_items} equally into {b_boxes}. How many {items} go into each {box}?",
          "{name} packs {a_items} into {boxes}, {b} in each {box}. How many {boxes} does {name} need?"),
    "+-": ("{name} has {a_items} and buys {b} more. Then {name} gives {c_items} to {name2}. "
           "How many {items} does {name} have now?",
           "There are {a_items} in {place}. {name} brings {b} more and {name2} takes {c} away. "
           "How many {items} are in {place} now?"),
    "*-": ("{name} buys {a_boxes} of {items} with {b} in each {box}, then gives {c_items} to {name2}. "
           "How many {items} does {name} have left?",
           "There are {a_boxes} with {b_items} in each {box}. {name} takes {c_items} away. "
           "How many {items} are left?"),
}
_KIND_OPS = {"add": ("+",), "sub": ("-",), "mul": ("*",), "div": ("/",), "two_step": ("+-", "*-")}
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
# Chinese textbooks write × and ÷; English documents stay ASCII.
_SYMBOLS = {"zh": {"+": "+", "-": "-", "*": "×", "/": "÷"}, "en": {"+": "+", "-": "-", "*": "*", "/": "/"}}

# Story tables: (Chinese, English) pairs; a story fills one template from each slot.
_STORY_PLACES = (("公园", "the park"), ("森林", "the forest"), ("海边", "the beach"), ("花园", "the garden"),
                 ("小河边", "the river"), ("农场", "the farm"), ("山上", "the hill"),
                 ("游乐场", "the playground"), ("动物园", "the zoo"))
_TIMES = (("一天早上", "one morning"), ("星期六下午", "on Saturday afternoon"), ("一个晴朗的日子", "on a sunny day"),
          ("放学以后", "after school"), ("暑假的一天", "one day in the summer holiday"),
          ("春天的一个早晨", "one spring morning"))
_TRAITS = (("勇敢", "brave"), ("好奇", "curious"), ("善良", "kind"), ("安静", "quiet"), ("活泼", "cheerful"),
           ("聪明", "clever"))
_OPENINGS = (("{time}，{name}去{place}玩。", "{Time}, {name} went to {place}."),
             ("{name}是一个{trait}的{kid}，最喜欢去{place}。", "{name} was a {trait} {kid} who loved going to {place}."),
             ("{time}，{name}和妈妈一起来到了{place}。", "{Time}, {name} and {his} mom went to {place}."),
             ("这是{name}第一次来{place}。", "It was {name}'s first visit to {place}."))
_OBJECT_LINES = (("{name}带着一{m}{obj}。", "{name} brought {a_obj} along."),
                 ("路上，{name}捡到了一{m}{obj}。", "On the way, {name} found {a_obj}."),
                 ("{name}的包里装着一{m}{obj}。", "{name} had {a_obj} in {his} bag."))
_HAPPY, _EXCITED, _SURPRISED = ("开心", "happy"), ("兴奋", "excited"), ("惊讶", "surprised")
_WORRIED, _SAD, _SCARED, _CURIOUS = ("着急", "worried"), ("难过", "sad"), ("害怕", "scared"), ("好奇", "curious")
# (event zh, event en, response zh, response en, feelings that fit the event)
_EVENTS = (
    ("忽然，一只小鸟飞过来，落在{name}的身边。", "Suddenly, a little bird flew down and landed next to {name}.",
     "{name}轻轻地和小鸟打招呼，小鸟高兴地唱起了歌。", "{name} said hello softly, and the bird began to sing.",
     (_SURPRISED, _HAPPY)),
    ("这时，{friend}跑过来，想和{name}一起玩。", "Then {friend} ran over and asked to play with {name}.",
     "{name}拿出{obj}和{friend}一起玩，两个人玩得很开心。",
     "{name} shared the {obj} with {friend}, and they played together all afternoon.", (_HAPPY, _EXCITED)),
    ("忽然，天上下起了大雨。", "Suddenly, it began to rain hard.",
     "{name}把{obj}放进包里，跑到大树下躲雨，等雨停了才出来。",
     "{name} put the {obj} in {his} bag and waited under a big tree until the rain stopped.",
     (_WORRIED, _SURPRISED)),
    ("可是没过多久，{name}发现{obj}不见了。", "But soon {name} saw that the {obj} was gone.",
     "{name}找了很久，最后在一棵大树下找到了{obj}。",
     "{name} looked everywhere and finally found the {obj} under a big tree.", (_WORRIED, _SAD)),
    ("走着走着，{name}遇到了一只迷路的小狗。", "A little later, {name} met a lost puppy.",
     "{name}陪着小狗，帮它找到了主人。", "{name} stayed with the puppy and helped it find its owner.",
     (_WORRIED, _SURPRISED)),
    ("突然，草丛里传来一阵奇怪的声音。", "Suddenly, {name} heard a strange sound in the grass.",
     "{name}走近一看，原来是一只小猫在找妈妈。", "{name} went closer and found a little kitten looking for its mother.",
     (_SCARED, _CURIOUS)),
    ("{name}抬起头，看见天上有一道美丽的彩虹。", "{name} looked up and saw a beautiful rainbow in the sky.",
     "{name}赶紧叫来{friend}，两个人一起看彩虹。", "{name} quickly called {friend}, and they watched the rainbow together.",
     (_EXCITED, _HAPPY)),
    ("跑着跑着，{name}不小心摔了一跤。", "While running, {name} tripped and fell.",
     "{name}自己站了起来，拍拍身上的土，又继续往前走。", "{name} got up, brushed off the dirt and kept going.",
     (_SAD, _SURPRISED)),
    ("这时，一位老奶奶的篮子掉在了地上。", "Just then, an old woman dropped her basket on the ground.",
     "{name}马上跑过去，帮老奶奶把东西捡了起来。", "{name} ran over at once and helped her pick everything up.",
     (_SURPRISED, _WORRIED)),
)
_FEELING_LINES = (("{name}觉得很{feeling}。", "{name} felt {feeling}."),
                  ("{he}心里有点{feeling}。", "{He} was a little {feeling}."))
_LESSONS = (("帮助别人是一件快乐的事。", "helping others brings joy"), ("和朋友在一起更快乐。", "friends make every day better"),
            ("遇到困难不要害怕。", "there is no need to fear problems"), ("做事要有耐心。", "patience pays off"),
            ("大自然真美好。", "nature is wonderful"))
_ENDINGS = (("天快黑了，{name}高高兴兴地回家了。", "When it got dark, {name} went home happily."),
            ("从那以后，{name}更喜欢{place}了。", "From that day on, {name} loved {place} even more."),
            ("{name}明白了：{lesson}", "{name} learned that {lesson}."),
            ("晚上，{name}把今天的事讲给妈妈听。", "That evening, {name} told {his} mom all about the day."))


@dataclass(frozen=True)
class WordProblem:
    """One arithmetic word problem whose answer can be checked exactly."""

    question: str
    answer: int
    solution: str  # worked steps ending in "答案：N" / "The answer is N."
    lang: str
    kind: str

    def text(self) -> str:
        """The problem as one pretraining document: question, newline, worked solution."""
        return f"{self.question}\n{self.solution}"


def _check_count(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_training_seed(seed: int) -> None:
    if seed == HELDOUT_SEED:
        raise ValueError(f"seed {HELDOUT_SEED} is HELDOUT_SEED, reserved for evaluation; use another seed")


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {', '.join(LANGS)}; got {lang!r}")


def _pick_lang(rng: random.Random, lang: str) -> str:
    return rng.choice(("zh", "en")) if lang == "both" else lang


def _count(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


def _sample_numbers(ops: str, rng: random.Random, max_value: int) -> tuple[int, ...]:
    """Operands for `ops`, chosen so every intermediate and final result is a non-negative integer."""
    table = min(max_value, 9)  # products stay within the multiplication table, which small models can learn
    if ops == "+":
        return rng.randint(1, max_value), rng.randint(1, max_value)
    if ops == "-":
        a = rng.randint(2, max_value)
        return a, rng.randint(1, a)
    if ops == "*":
        return rng.randint(2, table), rng.randint(2, table)
    if ops == "/":
        divisor = rng.randint(2, table)
        return divisor * rng.randint(1, table), divisor
    if ops == "+-":
        a, b = rng.randint(1, max_value), rng.randint(1, max_value)
        return a, b, rng.randint(1, a + b)
    a, b = rng.randint(2, table), rng.randint(2, table)  # "*-"
    return a, b, rng.randint(1, a * b)


def _solution(numbers: tuple[int, ...], ops: str, lang: str) -> tuple[str, int]:
    """Worked steps ("3 + 5 = 8") evaluated left to right, and the final value."""
    value, steps = numbers[0], []
    for op, operand in zip(ops, numbers[1:]):
        result = _APPLY[op](value, operand)
        steps.append(f"{value} {_SYMBOLS[lang][op]} {operand} = {result}")
        value = result
    if lang == "zh":
        return f"{'，'.join(steps)}。答案：{value}", value
    return f"{', '.join(steps)}. The answer is {value}.", value


def _word_problem(rng: random.Random, lang: str, max_value: int) -> WordProblem:
    kind = rng.choice(KINDS)
    ops = rng.choice(_KIND_OPS[kind])
    template = rng.choice((_ZH_PROBLEMS if lang == "zh" else _EN_PROBLEMS)[ops])
    (name, _), (name2, _) = rng.sample(_NAMES[lang], 2)
    item, container, place = rng.choice(_ITEMS), rng.choice(_CONTAINERS), rng.choice(_PROBLEM_PLACES)
    numbers = _sample_numbers(ops, rng, max_value)
    fields: dict[str, object] = {"name": name, "name2": name2}
    if lang == "zh":
        fields.update(place=place[0], m=item.measure, obj=item.zh, box=container[0], box_m=container[1])
    else:
        fields.update(place=place[1], items=item.en_plural, box=container[2], boxes=container[3])
    for letter, n in zip("abc", numbers):
        fields[letter] = n
        fields[f"{letter}_items"] = _count(n, item.en, item.en_plural)
        fields[f"{letter}_boxes"] = _count(n, container[2], container[3])
    solution, answer = _solution(numbers, ops, lang)
    return WordProblem(template.format(**fields), answer, solution, lang, kind)


def generate_word_problems(n: int, seed: int = 0, lang: str = "both", max_value: int = 20) -> list[WordProblem]:
    """`n` problems of every kind, evenly mixed; add/sub operands go up to `max_value`,
    mul/div factors up to min(max_value, 9)."""
    _check_count("n", n)
    _check_lang(lang)
    if max_value < 2:
        raise ValueError(f"max_value must be an integer >= 2, got {max_value}")
    rng = random.Random(seed)
    return [_word_problem(rng, _pick_lang(rng, lang), max_value) for _ in range(n)]


def heldout_word_problems(n: int, lang: str = "both") -> list[WordProblem]:
    """Evaluation problems from the reserved `HELDOUT_SEED`; never train on that seed."""
    return generate_word_problems(n, seed=HELDOUT_SEED, lang=lang)


def _story(rng: random.Random, lang: str) -> str:
    """5-6 sentences: opening, object, event, (feeling), response, ending, all about one character."""
    (name, gender), (friend, _) = rng.sample(_NAMES[lang], 2)
    item = rng.choice(_STORY_ITEMS)
    event = rng.choice(_EVENTS)
    feeling = rng.choice(event[4])
    place, time, trait, lesson = (rng.choice(table) for table in (_STORY_PLACES, _TIMES, _TRAITS, _LESSONS))
    i = 0 if lang == "zh" else 1
    fields = {"name": name, "friend": friend, "place": place[i], "trait": trait[i], "lesson": lesson[i],
              "time": time[i], "Time": time[i][:1].upper() + time[i][1:], "feeling": feeling[i]}
    if lang == "zh":
        fields.update(he="他" if gender == "m" else "她", kid="男孩" if gender == "m" else "女孩",
                      m=item.measure, obj=item.zh)
    else:
        he, his = ("he", "his") if gender == "m" else ("she", "her")
        article = "an" if item.en[0] in "aeiou" else "a"
        fields.update(he=he, He=he.capitalize(), his=his, kid="boy" if gender == "m" else "girl",
                      obj=item.en, a_obj=f"{article} {item.en}")
    lines = [rng.choice(_OPENINGS)[i], rng.choice(_OBJECT_LINES)[i], event[i]]
    if rng.random() < 0.5:
        lines.append(rng.choice(_FEELING_LINES)[i])
    lines += [event[2 + i], rng.choice(_ENDINGS)[i]]
    return ("" if lang == "zh" else " ").join(line.format(**fields) for line in lines)


def generate_stories(n: int, seed: int = 0, lang: str = "both") -> list[str]:
    """`n` short stories; with lang="both" each one is Chinese or English at random."""
    _check_count("n", n)
    _check_lang(lang)
    rng = random.Random(seed)
    return [_story(rng, _pick_lang(rng, lang)) for _ in range(n)]


def builtin_corpus(n_documents: int, seed: int = 0, lang: str = "both", problem_fraction: float = 0.5) -> list[str]:
    """Exactly `n_documents` stories and word-problem documents, shuffled together."""
    _check_count("n_documents", n_documents)
    _check_lang(lang)
    if not 0.0 <= problem_fraction <= 1.0:
        raise ValueError(f"problem_fraction must be in [0, 1], got {problem_fraction}")
    _check_training_seed(seed)
    n_problems = round(n_documents * problem_fraction)
    documents = [p.text() for p in generate_word_problems(n_problems, seed=seed, lang=lang)]
    documents += generate_stories(n_documents - n_problems, seed=seed, lang=lang)
    random.Random(seed).shuffle(documents)
    return documents


_NORMALISE = str.maketrans("０１２３４５６７８９－−", "0123456789--")
_NUMBER = r"(?<![0-9.])-?[0-9]+(?:\.[0-9]+)?"  # a minus right after a digit is subtraction, not a sign
_NUMBER_RE = re.compile(_NUMBER)
_MARKED_RE = re.compile(r"(?:答案\s*[是为]?\s*[:：]?|answer\s*(?:is|:|=)?)\s*(" + _NUMBER + ")", re.IGNORECASE)


def extract_answer(response: str) -> int | None:
    """The final answer in free-form text: the last number after "答案：" / "answer is", else the
    last number at all; None if there is none or it is not a whole number (2.5 must not pass as 2)."""
    text = response.translate(_NORMALISE)
    candidates = _MARKED_RE.findall(text) or _NUMBER_RE.findall(text)
    if not candidates:
        return None
    whole, _, fraction = candidates[-1].partition(".")
    return None if fraction.strip("0") else int(whole)


def check_answer(problem: WordProblem | int, response: str) -> bool:
    """True iff the response's final answer equals the problem's (or the given) answer."""
    expected = problem.answer if isinstance(problem, WordProblem) else problem
    return extract_answer(response) == expected


# ---------------------------------------------------------------------------------------- stage tasks
# The same word problems and stories, shaped for each later stage: SFT conversations, preference
# pairs, RL prompts with a checkable answer, and labelled token sequences for classification.

@dataclass(frozen=True)
class Identity:
    """Who the assistant says it is in the identity conversations."""

    name: str = "Mini-LLM"
    maker: str = "the Mini-LLM project"
    maker_zh: str = "Mini-LLM 项目"


_STORY_REQUESTS = {
    "zh": ("讲一个小故事吧。", "给我讲个故事。", "请讲一个简短的故事。", "你能讲个睡前故事吗？"),
    "en": ("Tell me a short story.", "Can you tell me a story?", "Please tell a short story.",
           "Tell me a bedtime story."),
}
_IDENTITY_TURNS = {
    "zh": (("你是谁？", "我是{name}，一个由{maker_zh}训练的小型语言模型。"),
           ("你叫什么名字？", "我叫{name}。"),
           ("是谁开发了你？", "我是由{maker_zh}开发的。"),
           ("你能做什么？", "我是{name}，可以讲小故事，也可以解答简单的数学应用题。")),
    "en": (("Who are you?", "I am {name}, a small language model trained by {maker}."),
           ("What is your name?", "My name is {name}."),
           ("Who made you?", "I was made by {maker}."),
           ("What can you do?", "I am {name}. I can tell short stories and solve simple math word problems.")),
}
_UNHELPFUL = {"zh": ("我不知道。", "这个问题太难了，我不想回答。", "你自己算吧。"),
              "en": ("I don't know.", "That is too hard, I would rather not answer.", "Work it out yourself.")}
TASK_KINDS = ("problem", "story", "identity")


def builtin_sft_conversations(n: int, seed: int = 0, lang: str = "both", identity: Identity | None = None,
                              mix: dict[str, float] | None = None) -> list[Conversation]:
    """`n` single-turn conversations: word problems answered with worked solutions, short stories on
    request, and identity questions answered as `identity` (the assistant's name and maker).

    `mix` gives the share of each kind (default: 70% problems, 20% stories, 10% identity).
    """
    _check_count("n", n)
    _check_lang(lang)
    _check_training_seed(seed)
    mix = mix or {"problem": 0.7, "story": 0.2, "identity": 0.1}
    unknown = set(mix) - set(TASK_KINDS)
    if unknown or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"mix must give non-negative shares for {', '.join(TASK_KINDS)}; got {mix}")
    identity = identity or Identity()
    rng = random.Random(seed)
    problems = iter(generate_word_problems(n, seed=seed, lang=lang))
    stories = iter(generate_stories(n, seed=seed + 1, lang=lang))
    kinds, weights = zip(*mix.items())
    conversations = []
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        if kind == "problem":
            problem = next(problems)
            user, assistant = problem.question, problem.solution
        elif kind == "story":
            story = next(stories)
            story_lang = "zh" if re.search(r"[\u4e00-\u9fff]", story) else "en"
            user, assistant = rng.choice(_STORY_REQUESTS[story_lang]), story
        else:
            turns = _IDENTITY_TURNS[_pick_lang(rng, lang)]
            question, answer = rng.choice(turns)
            user, assistant = question, answer.format(**identity.__dict__)
        conversations.append(Conversation((Message("user", user), Message("assistant", assistant))))
    return conversations


def _wrong_solution(problem: WordProblem, rng: random.Random) -> str:
    """The problem's solution with its last step and final answer wrong (off by 1-3, never negative)."""
    wrong = problem.answer + rng.choice((-3, -2, -1, 1, 2, 3))
    if wrong < 0:
        wrong = problem.answer + rng.randint(1, 3)
    steps, _, final = problem.solution.rpartition(f"= {problem.answer}")
    before, _, after = final.rpartition(str(problem.answer))
    return f"{steps}= {wrong}{before}{wrong}{after}"


def builtin_preference_pairs(n: int, seed: int = 0, lang: str = "both",
                             unhelpful_fraction: float = 0.2) -> list[PreferencePair]:
    """`n` word-problem preference pairs: the right worked solution is chosen over one whose final
    answer is wrong, or (for `unhelpful_fraction` of them) over an unhelpful refusal."""
    _check_count("n", n)
    _check_lang(lang)
    if not 0.0 <= unhelpful_fraction <= 1.0:
        raise ValueError(f"unhelpful_fraction must be in [0, 1], got {unhelpful_fraction}")
    _check_training_seed(seed)
    rng = random.Random(seed)
    pairs = []
    for problem in generate_word_problems(n, seed=seed, lang=lang):
        if rng.random() < unhelpful_fraction:
            rejected = rng.choice(_UNHELPFUL[problem.lang])
        else:
            rejected = _wrong_solution(problem, rng)
        pairs.append(PreferencePair((Message("user", problem.question),), problem.solution, rejected))
    return pairs


@dataclass(frozen=True)
class RLPrompt:
    """A prompt for RL (PPO/GRPO) with the answer the reward function checks against."""

    messages: tuple[Message, ...]
    answer: int
    problem: WordProblem

    def reward(self, response: str) -> float:
        """1.0 for a correct final answer, else 0.0 (the built-in checker)."""
        return float(check_answer(self.answer, response))


def builtin_rl_prompts(n: int, seed: int = 0, lang: str = "both", heldout: bool = False) -> list[RLPrompt]:
    """`n` word-problem prompts with their answers; `heldout=True` draws from the evaluation seed."""
    problems = heldout_word_problems(n, lang=lang) if heldout else generate_word_problems(n, seed=seed, lang=lang)
    return [RLPrompt((Message("user", p.question),), p.answer, p) for p in problems]


def labelled_vocab(num_codes: int = 64, num_classes: int = 4) -> dict[str, int]:
    """Word-level vocabulary of the labelled sequences: specials, `<Z_000>`… codes, `<CLS_0>`… labels."""
    tokens = ["<PAD>", "<UNK>", "<IMG>", "</IMG>", "<CLS>", "<EOS>"]
    tokens += [f"<Z_{i:03d}>" for i in range(num_codes)] + [f"<CLS_{k}>" for k in range(num_classes)]
    return {token: i for i, token in enumerate(tokens)}


def builtin_labelled_sequences(n: int, seed: int = 0, num_codes: int = 64, num_classes: int = 4,
                               length: tuple[int, int] = (8, 24), signal: float = 0.6) -> list[LabelledSequence]:
    """`n` sequences `<IMG> <Z_…> … </IMG> <CLS> <CLS_k> <EOS>` whose label is learnable from the codes:
    each class owns a band of codes, and a fraction `signal` of every sequence's codes come from its
    class's band (the rest are uniform noise), so the majority band decides the label."""
    _check_count("n", n)
    if num_classes < 2 or num_codes < num_classes:
        raise ValueError(f"need num_classes >= 2 and num_codes >= num_classes; got {num_classes}, {num_codes}")
    if not 0.0 < signal <= 1.0:
        raise ValueError(f"signal must be in (0, 1], got {signal}")
    rng = random.Random(seed)
    band = num_codes // num_classes
    sequences = []
    for _ in range(n):
        label = rng.randrange(num_classes)
        codes = [rng.randrange(label * band, (label + 1) * band) if rng.random() < signal
                 else rng.randrange(num_codes) for _ in range(rng.randint(*length))]
        tokens = ("<IMG>", *(f"<Z_{c:03d}>" for c in codes), "</IMG>", "<CLS>", f"<CLS_{label}>", "<EOS>")
        sequences.append(LabelledSequence(tokens, label))
    return sequences
