"""`minillm bench race` (minillm.benchmarks.race): the plain recipe against ours on one text. Tiny models and
a few steps on a generated text; the scores are checked against an independent computation, speed never."""

import dataclasses
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from minillm.benchmarks.race import (
    OURS,
    PLAIN,
    apply_overrides,
    build_runner,
    format_race,
    run_race,
    split_text,
    time_to_target,
)
from minillm.cli import main

WORDS = ("the king and queen walk to the castle where a fool sings of love and war while the night "
         "falls on old towns and young lords ride home").split()
# One layer, 32 wide, short windows: the race's mechanics, not its recipes' quality, are under test here.
TINY = ["plain.model.hidden_size=32", "plain.model.num_hidden_layers=1", "plain.model.num_attention_heads=2",
        "plain.batch_size=4", "plain.context=16", "ours.model.hidden_size=32", "ours.model.num_hidden_layers=1",
        "ours.model.num_attention_heads=2", "ours.model.intermediate_size=64", "ours.batch_size=4",
        "ours.context=16", "ours.vocab_size=320"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    lines = []
    for i in range(160):
        speaker = rng.choice(("KING", "QUEEN", "FOOL"))
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
        lines.append(f"{speaker}:\n{sentence.capitalize()}, {i}.\n")
    path = tmp_path_factory.mktemp("race") / "plays.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_recipes():
    return apply_overrides(PLAIN, OURS, TINY)


@pytest.fixture(scope="module")
def race(text_file, tiny_recipes):
    plain, ours = tiny_recipes
    return run_race(text_file, plain=plain, ours=ours, plain_steps=6, our_steps=6, eval_every=2, device="cpu",
                    seed=0)


def test_race_reports_both_runs_and_a_consistent_outcome(race):
    json.dumps(race)  # JSON-ready as it is
    plain, ours = race["plain"], race["ours"]
    assert plain["steps"] == 6 and ours["steps"] == 6
    assert plain["tokenizer"] == "char" and ours["tokenizer"] == "bpe" and ours["vocab_size"] == 320
    assert plain["tokens"] == 6 * 4 * 16 and ours["tokens"] == 6 * 4 * 16
    for run in (plain, ours):
        assert 0 < run["parameters_without_embeddings"] < run["parameters"]
        assert run["seconds"] > 0
        assert math.isclose(run["final_bits_per_byte"],  # the text is ASCII: one byte per character
                            run["final_nats_per_char"] / math.log(2), rel_tol=1e-9)
    assert [p["step"] for p in ours["curve"]] == [2, 4, 6]
    assert [p["step"] for p in plain["curve"]] == [6]
    seconds = [p["seconds"] for p in ours["curve"]]
    assert seconds == sorted(seconds) and seconds[-1] == ours["seconds"]
    # characters per token: one for characters, more for BPE
    assert plain["chars_per_token"] == 1.0 and ours["chars_per_token"] > 1.2

    outcome = race["outcome"]
    target = outcome["target_nats_per_char"]
    assert target == plain["final_nats_per_char"] and outcome["plain_seconds"] == plain["seconds"]
    below = [p for p in ours["curve"] if p["nats_per_char"] <= target]
    assert outcome["reached"] == bool(below)
    if below:  # the first evaluation at or below the target, its clock, and the ratio of that to plain's
        assert outcome["step"] == below[0]["step"] and outcome["seconds"] == below[0]["seconds"]
        assert outcome["ratio"] == pytest.approx(below[0]["seconds"] / plain["seconds"])
    else:
        assert outcome["ratio"] is None and outcome["seconds"] is None


def test_time_to_target_takes_the_first_evaluation_at_the_target_and_interpolates():
    curve = [{"step": 10, "seconds": 1.0, "nats_per_char": 3.0}, {"step": 20, "seconds": 2.0, "nats_per_char": 2.0},
             {"step": 30, "seconds": 3.0, "nats_per_char": 1.0}, {"step": 40, "seconds": 4.0, "nats_per_char": 0.5}]
    outcome = time_to_target(curve, 1.5, plain_seconds=10.0)
    assert outcome["reached"] and outcome["step"] == 30 and outcome["seconds"] == 3.0
    assert outcome["seconds_interpolated"] == pytest.approx(2.5)  # halfway from 2.0 nats down to 1.0
    assert outcome["ratio"] == pytest.approx(0.3) and outcome["ratio_interpolated"] == pytest.approx(0.25)
    missed = time_to_target(curve, 0.1, plain_seconds=10.0)
    assert not missed["reached"] and missed["ratio"] is None and missed["step"] is None


def test_validation_text_starts_at_a_line_break_and_is_the_rest_of_the_text(text_file):
    text = text_file.read_text(encoding="utf-8")
    train, val = split_text(text, 0.1)
    assert train + val == text
    assert val[0] == "\n" and not val[1].isspace() and not train[-1].isspace()
    assert 0.08 < len(val) / len(text) < 0.2
    _, subset = split_text(text, 0.1, eval_chars=100)
    assert val.startswith(subset) and subset.endswith("\n") and 100 <= len(subset) < 200


@pytest.mark.parametrize("side", ["plain", "ours"])
def test_nats_per_char_equals_an_independent_computation(text_file, tiny_recipes, side):
    """Trained a few steps, then scored: the race's number against the summed cross-entropy of one forward
    pass over the whole validation text, divided by its characters (all but the first line break)."""
    text = text_file.read_text(encoding="utf-8")
    train, val = split_text(text, 0.1, eval_chars=150)
    recipe = dict(zip(("plain", "ours"), tiny_recipes))[side]
    recipe = dataclasses.replace(recipe, context=256, steps=3)  # one window holds the whole validation text
    runner = build_runner(side, recipe, text, train, val, device=torch.device("cpu"), precision="fp32", seed=0,
                          eval_batch_size=8)
    runner.train(3)
    point = runner.evaluate()

    ids = torch.tensor(runner.tokenizer.encode(val))
    assert len(ids) <= 256
    assert runner.tokenizer.decode(ids.tolist()) == val  # each side is scored on these very characters
    model = runner.trainer.base_model.eval()
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    nats = F.cross_entropy(logits[:-1].double(), ids[1:], reduction="sum").item()
    assert point["nats_per_char"] == pytest.approx(nats / (len(val) - 1), rel=1e-5)
    assert point["bits_per_byte"] == pytest.approx(nats / math.log(2) / len(val[1:].encode()), rel=1e-5)
    if side == "plain":  # one token per character: nats per character is the per-token loss
        assert point["nats_per_char"] == pytest.approx(point["val_loss_per_token"], rel=1e-9)


def test_both_runs_score_the_same_characters(text_file, tiny_recipes):
    text = text_file.read_text(encoding="utf-8")
    train, val = split_text(text, 0.1)
    runners = [build_runner(side, recipe, text, train, val, device=torch.device("cpu"), precision="fp32", seed=0,
                            eval_batch_size=8) for side, recipe in zip(("plain", "ours"), tiny_recipes)]
    decoded = [r.tokenizer.decode(r.tokenizer.encode(val)) for r in runners]
    assert decoded == [val, val]
    assert [r.val_chars for r in runners] == [len(val) - 1] * 2
    plain_ids, our_ids = (r.tokenizer.encode(val) for r in runners)
    assert len(our_ids) < len(plain_ids) == len(val)


def test_table_reports_the_race(race):
    table = format_race(race)
    for row in ("parameters", "without embeddings", "steps", "tokens", "training seconds", "final val nats/char",
                "final val bits/byte"):
        assert row in table
    assert ("x plain's training time" in table or "did NOT reach" in table)


def test_command_writes_json_and_table(text_file, tmp_path, capsys):
    out = tmp_path / "race.json"
    code = main(["bench", "race", "--text", str(text_file), "--steps", "4", "--our-steps", "2", "--eval-every", "1",
                 "--device", "cpu", "--out", str(out), *[item for s in TINY for item in ("--set", s)]])
    assert code == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["plain"]["steps"] == 4 and result["ours"]["steps"] == 2
    assert len(result["ours"]["curve"]) == 2
    printed = capsys.readouterr().out
    assert "final val nats/char" in printed and f"wrote {out}" in printed


@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_missing_or_empty_text_is_one_error_line(tmp_path, capsys, content):
    path = tmp_path / "plays.txt"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    code = main(["bench", "race", "--text", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and str(path) in err and "Traceback" not in err


def test_bench_help_keeps_its_options_and_race_help_has_examples(capsys):
    for argv in (["bench", "--help"], ["bench", "race", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "race" in out
    assert "examples:" in out and "minillm bench race --text" in out


def test_overrides_change_a_copy_and_refuse_unknown_keys():
    plain, ours = apply_overrides(PLAIN, OURS, ["ours.training.muon_lr=0.03", "plain.steps=10",
                                                "ours.model.qk_norm=false"])
    assert ours.training["muon_lr"] == 0.03 and plain.steps == 10 and ours.model["qk_norm"] is False
    assert OURS.training["muon_lr"] == 0.02 and PLAIN.steps != 10 and OURS.model["qk_norm"] is True
    for bad in ("ours.nonsense=1", "third.steps=1", "ours.steps"):
        with pytest.raises(ValueError):
            apply_overrides(PLAIN, OURS, [bad])
