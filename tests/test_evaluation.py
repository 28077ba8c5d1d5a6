"""Evaluation: every metric against an independent computation, and the `minillm eval` command."""

import csv
import json
import math
import random
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from minillm.cli import main
from minillm.data.builtin import HELDOUT_SEED, builtin_corpus, builtin_labelled_sequences, labelled_vocab
from minillm.data.formats import DataError
from minillm.data.labelled import LabelledSequenceDataset, WordLevelTokenizer
from minillm.evaluation import (
    MultipleChoiceQuestion,
    bleu,
    build_prompt,
    evaluate_classification,
    evaluate_multiple_choice,
    evaluate_perplexity,
    evaluate_references,
    format_results,
    load_multiple_choice,
    rouge,
    rouge_scores,
)
from minillm.evaluation.multiple_choice import LETTERS
from minillm.inference.generator import TextGenerator
from minillm.model import MiniGPT, MiniGPTConfig
from minillm.tokenizer.chat import encode_chat
from minillm.training.trainer import PreTrainer, TrainingConfig


@pytest.fixture(scope="module")
def model(chat_model):
    """The shared random model (context 128): its predictions depend strongly on the context."""
    return chat_model


# ---------------------------------------------------------------------------------------- perplexity
def _manual_nll(model, ids: list[int], scored: list[bool] | None = None) -> tuple[float, int, int]:
    """Summed NLL, scored-token count and argmax hits of one document in one forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    targets = torch.tensor(ids[1:])
    keep = torch.ones(len(targets), dtype=torch.bool) if scored is None else torch.tensor(scored[1:])
    nll = F.cross_entropy(logits[keep], targets[keep], reduction="sum")
    hits = (logits[keep].argmax(-1) == targets[keep]).sum()
    return float(nll), int(keep.sum()), int(hits)


def test_perplexity_is_exp_of_the_mean_token_loss(model, tokenizer, tmp_path):
    texts = ["小明有3个苹果，又买了5个。", "Once upon a time, a curious cat went to the park.", "天空很蓝。"]
    # and a text the model wrote itself, so that some next-token predictions are right
    texts.append("天空" + TextGenerator(model, tokenizer).generate("天空", max_new_tokens=20, do_sample=False))
    result = evaluate_perplexity(model, tokenizer, texts, batch_size=2)
    nll = tokens = hits = 0
    for text in texts:  # BOS first, then every token of the document is scored
        n, t, h = _manual_nll(model, tokenizer.encode(text, add_special_tokens=True))
        nll, tokens, hits = nll + n, tokens + t, hits + h
    assert result.tokens == tokens == sum(len(tokenizer.encode(t)) for t in texts)
    assert result.loss == pytest.approx(nll / tokens, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert 0 < result.accuracy == hits / tokens < 1
    assert result.documents == 4

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    assert evaluate_perplexity(model, tokenizer, tmp_path / "docs.jsonl").loss == pytest.approx(result.loss, rel=1e-6)
    (tmp_path / "one.txt").write_text(texts[1], encoding="utf-8")
    single = evaluate_perplexity(model, tokenizer, tmp_path / "one.txt")  # a text file is one document
    assert single.documents == 1 and single.tokens == len(tokenizer.encode(texts[1]))


def test_perplexity_of_conversations_scores_only_the_assistant_tokens(model, tokenizer, tmp_path):
    conversations = [[{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！我是小助手。"}],
                     [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "答案：2"}]]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations),
                    encoding="utf-8")
    result = evaluate_perplexity(model, tokenizer, path)
    nll = tokens = 0
    for conversation in conversations:
        ids, mask = encode_chat(tokenizer, conversation)
        n, t, _ = _manual_nll(model, ids, [bool(m) for m in mask])
        nll, tokens = nll + n, tokens + t
    assert result.tokens == tokens < sum(len(encode_chat(tokenizer, c)[0]) for c in conversations)
    assert result.loss == pytest.approx(nll / tokens, rel=1e-5)


def _hf_stride_reference(model, ids: list[int], max_length: int, stride: int) -> float:
    """The Hugging Face perplexity guide's loop, written out: windows every `stride` tokens, each scoring
    only the tokens past the previous window's end; token-weighted mean NLL."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        target_len = end - prev_end  # tokens this window scores (the window's first can never be)
        window = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            logits = model(window).logits[0, :-1]
        targets = window[0, 1:].clone()
        targets[:-target_len] = -100
        nll += float(F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
        count += int((targets != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    assert count == len(ids) - 1
    return nll / count


def test_sliding_window_perplexity_follows_the_stride_recipe(model, tokenizer):
    text = " ".join(builtin_corpus(8, seed=5))
    ids = tokenizer.encode(text, add_special_tokens=True)
    assert len(ids) > 3 * model.config.max_position_embeddings  # several windows, past the model's context
    losses = {}
    for stride in (16, 64, 127):
        result = evaluate_perplexity(model, tokenizer, [text], max_length=128, stride=stride, batch_size=4)
        assert result.tokens == len(ids) - 1  # every token scored once
        reference = _hf_stride_reference(model, ids, 128, stride)
        assert result.loss == pytest.approx(reference, rel=1e-5)
        losses[stride] = result.loss
    # the context a token gets changes the loss by far more than the tolerance above: the check has teeth
    assert abs(losses[16] - losses[127]) > 100 * 1e-5 * losses[16]

    # stride 1: every token after the first max_length - 1 sees exactly the max_length - 1 tokens before it
    short_text = text[:300]
    short = tokenizer.encode(short_text, add_special_tokens=True)
    result = evaluate_perplexity(model, tokenizer, [short_text], max_length=24, stride=1)
    nll = 0.0
    with torch.no_grad():
        for t in range(1, len(short)):
            context = torch.tensor([short[max(0, t - 23):t]])
            nll -= float(model(context).logits[0, -1].log_softmax(-1)[short[t]])
    assert result.tokens == len(short) - 1
    assert result.loss == pytest.approx(nll / (len(short) - 1), rel=1e-5)


def test_perplexity_rejects_a_stride_without_overlap(model, tokenizer):
    with pytest.raises(ValueError, match="stride"):
        evaluate_perplexity(model, tokenizer, ["一二三四五六七八九十" * 20], max_length=16, stride=16)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        evaluate_perplexity(model, tokenizer, ["短"], max_length=129)


# ---------------------------------------------------------------------------------------- multiple choice
QUESTIONS = ["小明有3个苹果，又买了5个，现在有几个？", "天空是什么颜色的？", "一年有多少天？", "中国的首都是哪里？",
             "What is two plus two?", "猫喜欢吃什么？", "哪个数最大？", "水在几度结冰？"]


def _whole_tokens(tokenizer) -> list[int]:
    """Tokens that are printable strings of their own: their text encodes back to the token alone."""
    return [t for t in range(len(tokenizer)) if t not in tokenizer.special_token_ids
            and tokenizer.decode([t]).isprintable() and tokenizer.encode(tokenizer.decode([t])) == [t]]


def _greedy_tokens(model, tokenizer, prompt: str, n: int) -> list[int]:
    """The model's greedy continuation of `prompt` over whole-string tokens (so that its text, appended to
    the prompt, encodes back to the same tokens)."""
    whole = _whole_tokens(tokenizer)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([prompt_ids + new])).logits[0, -1]
            new.append(whole[int(logits[whole].argmax())])
    assert tokenizer.encode(prompt + tokenizer.decode(new), add_special_tokens=True) == prompt_ids + new
    return new


@pytest.fixture(scope="module")
def greedy_questions(model, tokenizer) -> list[MultipleChoiceQuestion]:
    """Questions whose right option is the model's own greedy continuation of the option prompt; each
    wrong option has random tokens of the same lengths in characters (so both the per-character and the
    raw score must prefer the greedy one)."""
    rng = random.Random(0)
    by_length = defaultdict(list)
    for t in _whole_tokens(tokenizer):
        by_length[len(tokenizer.decode([t]))].append(t)
    questions = []
    for i, question in enumerate(QUESTIONS):
        subject = "s" if i < 5 else "other_subject"
        prompt = build_prompt(MultipleChoiceQuestion(question, ("", ""), 0, subject), [], "option")
        greedy = _greedy_tokens(model, tokenizer, prompt, 3)
        options = [tokenizer.decode([rng.choice(by_length[len(tokenizer.decode([t]))]) for t in greedy])
                   for _ in range(3)]
        answer = i % 4
        options.insert(answer, tokenizer.decode(greedy))
        questions.append(MultipleChoiceQuestion(question, tuple(options), answer, subject))
    return questions


def test_option_likelihood_picks_the_models_own_continuation(model, tokenizer, greedy_questions):
    result = evaluate_multiple_choice(model, tokenizer, greedy_questions, method="option", batch_size=3)
    assert result.methods == ["option", "option_raw"]
    assert result.accuracy == {"option": 1.0, "option_raw": 1.0}
    for question, prediction in zip(greedy_questions, result.predictions):
        assert prediction["predicted"]["option"] == LETTERS[question.answer]
        raw, chars = prediction["scores"]["option_raw"], [len(c) for c in question.choices]
        assert prediction["scores"]["option"] == pytest.approx([r / n for r, n in zip(raw, chars)], abs=1e-3)


def test_letter_scores_are_the_next_token_log_probs_of_the_letters(model, tokenizer, greedy_questions):
    result = evaluate_multiple_choice(model, tokenizer, greedy_questions, method="letter")
    for question, prediction in zip(greedy_questions, result.predictions):
        prompt = build_prompt(question, [], "letter")
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
        assert len(prompt_ids) <= 128
        for letter in "ABCD":  # after "答案：" a letter is one token of its own
            assert tokenizer.encode(prompt + letter, add_special_tokens=True)[:-1] == prompt_ids
        logps = _letter_logps(model, tokenizer, prompt)
        assert prediction["scores"]["letter"] == pytest.approx(logps, abs=1e-3)
        assert prediction["predicted"]["letter"] == "ABCD"[logps.index(max(logps))]


def test_subject_and_overall_accuracies_add_up(model, tokenizer, greedy_questions):
    result = evaluate_multiple_choice(model, tokenizer, greedy_questions, method="both")
    assert result.methods == ["letter", "option", "option_raw"]
    assert sum(s["n"] for s in result.subjects.values()) == result.n == len(greedy_questions)
    for method in result.methods:
        correct = sum(p["predicted"][method] == p["answer"] for p in result.predictions)
        assert sum(s["correct"][method] for s in result.subjects.values()) == correct == result.correct[method]
        assert result.accuracy[method] == correct / result.n
        subject_accuracies = [s["correct"][method] / s["n"] for s in result.subjects.values()]
        assert result.macro_accuracy[method] == pytest.approx(sum(subject_accuracies) / len(subject_accuracies))
    table = result.format()
    assert "other_subject" in table and "(micro) all" in table
    json.dumps(result.to_dict())


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


MC_ROWS = [("1+1等于几？", "1", "2", "3", "4", "B"), ("天空是\n什么颜色？", "红", "绿", "蓝", "黑", "C"),
           ("一周有几天？", "5", "6", "7", "8", "c")]


def test_csv_and_jsonl_questions_parse_alike(model, tokenizer, tmp_path):
    ceval = tmp_path / "ceval"
    ceval.mkdir()
    _write_csv(ceval / "basic_math_val.csv", ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
               [(i, *row, "") for i, row in enumerate(MC_ROWS)])
    _write_csv(tmp_path / "basic_math.csv", ["", "Question", "A", "B", "C", "D", "Answer"],  # CMMLU's header
               [(i, *row) for i, row in enumerate(MC_ROWS)])
    records = [{"question": MC_ROWS[0][0], "choices": list(MC_ROWS[0][1:5]), "answer": 1, "id": "0"},
               {"question": MC_ROWS[1][0], **dict(zip("ABCD", MC_ROWS[1][1:5])), "answer": "C", "id": "1"},
               {"question": MC_ROWS[2][0], "choices": list(MC_ROWS[2][1:5]), "answer": "C", "id": "2"}]
    (tmp_path / "basic_math_val.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")

    loaded = [load_multiple_choice(ceval), load_multiple_choice(tmp_path / "basic_math.csv"),
              load_multiple_choice(tmp_path / "basic_math_val.jsonl")]
    for questions in loaded:
        assert [(q.question, q.choices, q.answer, q.subject, q.id) for q in questions] == [
            (row[0], row[1:5], "ABCD".index(row[5].upper()), "basic_math", str(i)) for i, row in enumerate(MC_ROWS)]
    assert [q.line for q in loaded[0]] == [2, 3, 5]  # the second question's cell spans two lines
    scores = [evaluate_multiple_choice(model, tokenizer, questions).predictions for questions in loaded]
    assert [p["scores"] for p in scores[0]] == [p["scores"] for p in scores[1]] == [p["scores"] for p in scores[2]]


def _letter_logps(model, tokenizer, prompt: str) -> list[float]:
    """log p(letter | prompt) for A-D from one forward pass over the prompt's last max_position_embeddings tokens."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    letter_ids = [tokenizer.encode(prompt + letter, add_special_tokens=True)[-1] for letter in "ABCD"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids[-model.config.max_position_embeddings:]])).logits
    return logits[0, -1].log_softmax(-1)[letter_ids].tolist()


def test_few_shot_prompts_hold_the_first_k_dev_questions(model, tokenizer, tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "dev").mkdir()
    _write_csv(tmp_path / "val" / "basic_math_val.csv", ["id", "question", "A", "B", "C", "D", "answer"],
               [(i, *row) for i, row in enumerate(MC_ROWS)])
    dev_rows = [(f"开发题{i}：{i}+{i}=?", str(2 * i), "0", "99", "98", "A") for i in range(1, 6)]
    _write_csv(tmp_path / "dev" / "basic_math_dev.csv", ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
               [(i, *row, "解释") for i, row in enumerate(dev_rows)])

    dev = load_multiple_choice(tmp_path / "dev" / "basic_math_dev.csv")
    question = load_multiple_choice(tmp_path / "val")[0]
    prompt = build_prompt(question, dev[:2], "letter")
    for row in dev_rows[:2]:
        assert f"{row[0]}\nA. {row[1]}\nB. 0\nC. 99\nD. 98\n答案：A\n\n" in prompt
    assert dev_rows[2][0] not in prompt and prompt.endswith(f"{question.question}\nA. 1\nB. 2\nC. 3\nD. 4\n答案：")
    assert f"{dev_rows[0][0]}\n答案：{dev_rows[0][1]}\n\n" in build_prompt(question, dev[:2], "option")

    # the evaluation finds the dev file in the sibling dev/ directory and scores these very prompts
    torch.manual_seed(0)
    long_model = MiniGPT(MiniGPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
                                       initializer_range=0.5)).eval()
    two_shot = evaluate_multiple_choice(long_model, tokenizer, tmp_path / "val", few_shot=2, method="letter")
    zero_shot = evaluate_multiple_choice(long_model, tokenizer, tmp_path / "val", method="letter")
    assert two_shot.predictions[0]["scores"]["letter"] == pytest.approx(_letter_logps(long_model, tokenizer, prompt),
                                                                        abs=1e-3)
    assert two_shot.predictions[0]["scores"] != zero_shot.predictions[0]["scores"]
    assert two_shot.few_shot == 2 and two_shot.truncated == 0

    # five shots overflow a 128-token context: the prompts lose their beginning and are counted
    result = evaluate_multiple_choice(model, tokenizer, tmp_path / "val", few_shot=5, method="letter")
    assert result.truncated == len(MC_ROWS)
    five_shot = build_prompt(question, dev, "letter")
    assert len(tokenizer.encode(five_shot, add_special_tokens=True)) > 128
    assert result.predictions[0]["scores"]["letter"] == pytest.approx(_letter_logps(model, tokenizer, five_shot),
                                                                      abs=1e-3)

    # an explicit dev file serves too; questions from no file cannot find one
    explicit = evaluate_multiple_choice(long_model, tokenizer, [question], few_shot=2, method="letter",
                                        dev=tmp_path / "dev" / "basic_math_dev.csv")
    assert explicit.predictions[0]["scores"] == two_shot.predictions[0]["scores"]
    with pytest.raises(DataError, match="needs dev questions for subject 'orphan'"):
        evaluate_multiple_choice(model, tokenizer, [MultipleChoiceQuestion("题", ("a", "b"), 0, "orphan")], few_shot=1)


def test_malformed_questions_name_file_and_line(tmp_path):
    header = ["id", "question", "A", "B", "C", "D", "answer"]
    cases = {"short_row": ([(0, *MC_ROWS[0]), (1, "缺了一列", "1", "2", "3", "B")], ":3: expected 7 fields"),
             "bad_letter": ([(0, *MC_ROWS[0]), (1, "题", "1", "2", "3", "4", "E")], ":3: answer must be one of"),
             "empty_option": ([(0, "题", "1", "", "3", "4", "A")], ":2: option B is empty")}
    for name, (rows, message) in cases.items():
        path = tmp_path / f"{name}_val.csv"
        _write_csv(path, header, rows)
        with pytest.raises(DataError, match=f"{path}{message}"):
            load_multiple_choice(path)
    path = tmp_path / "no_answer_test.csv"
    _write_csv(path, header[:-1], [(0, *MC_ROWS[0][:-1])])
    with pytest.raises(DataError, match=f"{path}:1: missing column 'answer'"):
        load_multiple_choice(path)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "choices": ["a", "b"], "answer": "A"}\n\n'
                    '{"question": "q", "choices": ["a", "b"], "answer": 2}\n', encoding="utf-8")
    with pytest.raises(DataError, match=f"{path}:3: answer index 2 is out of range"):
        load_multiple_choice(path)


# ---------------------------------------------------------------------------------------- classification
@pytest.fixture(scope="module")
def classifier():
    """A small MiniGPT trained with the project's Trainer on the built-in labelled sequences, loss on the
    label token only (a few seconds on one CPU thread)."""
    tokenizer = WordLevelTokenizer(labelled_vocab())
    train = LabelledSequenceDataset(builtin_labelled_sequences(4000, seed=1), tokenizer, loss_on="label")
    torch.manual_seed(0)
    config = MiniGPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, intermediate_size=64, max_position_embeddings=32)
    model = MiniGPT(config)
    trainer = PreTrainer(model, tokenizer, TrainingConfig(batch_size=64, max_steps=150, lr=5e-3, warmup_steps=20,
                                                          weight_decay=0.0, precision="fp32", progress=False,
                                                          log_every=50), device="cpu", train_data=train)
    trainer.train()
    return model.eval(), tokenizer


def test_label_token_classification_after_training(classifier, tmp_path):
    model, tokenizer = classifier
    heldout = builtin_labelled_sequences(600, seed=HELDOUT_SEED)
    result = evaluate_classification(model, tokenizer, heldout)
    assert result.accuracy >= 0.95
    assert sum(map(sum, result.confusion)) == result.n == 600
    assert sum(result.confusion[k][k] for k in range(4)) / result.n == result.accuracy
    assert [c["support"] for c in result.per_class] == [sum(s.label == k for s in heldout) for k in range(4)]
    assert [c["predicted"] for c in result.per_class] == [result.predictions.count(k) for k in range(4)]

    # the same sequences from a JSONL file with a vocab.json give the same predictions
    (tmp_path / "vocab.json").write_text(json.dumps(labelled_vocab()), encoding="utf-8")
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"tokens": " ".join(s.tokens), "label": s.label}) + "\n"
                                                 for s in heldout), encoding="utf-8")
    from_file = evaluate_classification(model, WordLevelTokenizer.from_file(tmp_path / "vocab.json"),
                                        tmp_path / "test.jsonl")
    assert from_file.predictions == result.predictions
    assert "true \\ predicted" in result.format()


def test_untrained_classifier_is_near_chance(classifier):
    _, tokenizer = classifier
    torch.manual_seed(1)
    config = MiniGPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=4, intermediate_size=64, max_position_embeddings=32)
    result = evaluate_classification(MiniGPT(config), tokenizer, builtin_labelled_sequences(400, seed=HELDOUT_SEED))
    assert result.accuracy < 0.5


# ---------------------------------------------------------------------------------------- BLEU and ROUGE
def test_bleu_is_sacrebleus_corpus_bleu():
    import sacrebleu

    predictions = ["the cat sat on the mat", "a quick brown fox jumps", "hello world"]
    references = [["the cat is on the mat", "there is a cat on the mat"], ["the quick brown fox jumped"],
                  ["hello there world"]]
    score, signature = bleu(predictions, references)
    streams = [[r[0] for r in references], [r[1] if len(r) > 1 else None for r in references]]
    assert score == pytest.approx(sacrebleu.corpus_bleu(predictions, streams, tokenize="13a").score)
    assert "tok:13a" in signature and "nrefs:var" in signature

    zh_predictions, zh_references = ["我爱北京天安门", "今天天气很好"], [["我爱北京的天安门"], ["今天的天气很好"]]
    score, signature = bleu(zh_predictions, zh_references)
    assert score == pytest.approx(sacrebleu.corpus_bleu(zh_predictions, [[r[0] for r in zh_references]],
                                                        tokenize="zh").score)
    assert "tok:zh" in signature


def test_rouge_against_hand_computed_values():
    english = rouge_scores("The cat sat on the mat.", "the cat lay on the mat")
    # unigrams: the×2, cat, on, mat shared of 6 and 6; bigrams: "the cat", "on the", "the mat" of 5 and 5;
    # longest common subsequence: the cat on the mat (5)
    assert english == pytest.approx({"rouge1": 5 / 6, "rouge2": 3 / 5, "rougeL": 5 / 6})
    chinese = rouge_scores("我爱北京", "我爱上海")  # characters: 我 爱 shared; bigram 我爱 of 3 and 3
    assert chinese == pytest.approx({"rouge1": 0.5, "rouge2": 1 / 3, "rougeL": 0.5})
    uneven = rouge_scores("猫", "小猫在睡觉")  # P = 1, R = 1/5
    assert uneven["rouge1"] == pytest.approx(2 * 1 * 0.2 / 1.2)
    assert rouge_scores("", "abc") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # several references: each example's best; the corpus score is the mean over examples
    assert rouge(["我爱北京", "猫"], [["我爱上海", "我爱北京"], ["狗"]]) == pytest.approx(
        {"rouge1": 0.5, "rouge2": 0.5, "rougeL": 0.5})


def test_rouge_equals_the_rouge_score_package_on_english():
    rouge_score = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_score.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    pairs = [("The quick brown fox jumps over the lazy dog.", "A quick brown dog jumps over the lazy fox!"),
             ("It was 3 o'clock, and the train had left.", "The train left at 3 o'clock."),
             ("completely different words", "nothing shared here"),
             ("the the the cat", "the cat the dog the")]
    for prediction, reference in pairs:
        theirs = scorer.score(reference, prediction)
        assert rouge_scores(prediction, reference) == pytest.approx({k: v.fmeasure for k, v in theirs.items()})


def test_reference_generation_is_scored_on_its_own_predictions(model, tokenizer, tmp_path):
    path = tmp_path / "refs.jsonl"
    records = [{"prompt": "你好", "reference": "你好！"}, {"prompt": "讲个故事", "references": ["从前有座山", "很久以前"]},
               {"prompt": [{"role": "user", "content": "1+1=?"}], "system": "你是数学老师。", "reference": "2"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    result = evaluate_references(TextGenerator(model, tokenizer), path, max_new_tokens=8, batch_size=2)
    predictions = [e["prediction"] for e in result.examples]
    references = [e["references"] for e in result.examples]
    assert result.n == 3 and all(predictions)
    assert (result.bleu, result.bleu_signature) == bleu(predictions, references)
    assert {"rouge1": result.rouge1, "rouge2": result.rouge2, "rougeL": result.rougeL} == pytest.approx(
        rouge(predictions, references))

    with pytest.raises(DataError, match=f"{path}:3: a plain-text prompt must be one string"):
        evaluate_references(TextGenerator(model, tokenizer), path, chat=False)
    path.write_text('{"prompt": "你好"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=f"{path}:1: need a non-empty string field 'reference'"):
        evaluate_references(TextGenerator(model, tokenizer), path)


# ---------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def checkpoint(model, tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_cli_eval_prints_tables_and_writes_json(checkpoint, model, tokenizer, tmp_path, capsys):
    text = tmp_path / "book.txt"
    text.write_text(" ".join(builtin_corpus(3, seed=7)), encoding="utf-8")
    questions = tmp_path / "basic_math_val.csv"
    _write_csv(questions, ["id", "question", "A", "B", "C", "D", "answer"], [(i, *r) for i, r in enumerate(MC_ROWS)])
    out = tmp_path / "results.json"
    code = main(["eval", str(checkpoint), "--perplexity", str(text), "--max-length", "64", "--stride", "32",
                 "--multiple-choice", str(questions), "--word-problems", "2", "--max-new-tokens", "8",
                 "--device", "cpu", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    for heading in ("## perplexity", "## multiple_choice", "## word_problems", "| perplexity"):
        assert heading in printed
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert [r["task"] for r in saved["results"]] == ["perplexity", "multiple_choice", "word_problems"]
    expected = evaluate_perplexity(model, tokenizer, text, max_length=64, stride=32)
    assert saved["results"][0]["perplexity"] == pytest.approx(expected.perplexity)
    assert saved["results"][0]["summary"]["stride"] == 32
    assert saved["results"][2]["n"] == 2 and len(saved["results"][2]["examples"]) == 2
    assert format_results([expected]) in printed


def test_cli_eval_classification_reads_the_checkpoints_vocab(classifier, tmp_path, capsys):
    model, tokenizer = classifier
    model.save_pretrained(tmp_path / "cls")
    (tmp_path / "cls" / "vocab.json").write_text(json.dumps(tokenizer.vocab), encoding="utf-8")
    assert main(["eval", str(tmp_path / "cls"), "--classification", "builtin", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "## classification (builtin" in printed and "true \\ predicted" in printed


def test_cli_eval_errors_exit_2_naming_the_problem(checkpoint, tmp_path, capsys):
    missing = tmp_path / "nowhere.txt"
    assert main(["eval", str(checkpoint), "--perplexity", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert main(["eval", str(checkpoint)]) == 2
    assert "give at least one task" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--word-problems", "1"]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    text = tmp_path / "a.txt"
    text.write_text("一二三四五六七八九十" * 10, encoding="utf-8")
    assert main(["eval", str(checkpoint), "--perplexity", str(text), "--max-length", "16", "--stride", "16",
                 "--device", "cpu"]) == 2
    assert "stride must be in [1, max_length)" in capsys.readouterr().err


def test_eval_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--multiple-choice" in out
