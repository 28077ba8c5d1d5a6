"""The quickstart pipeline's machinery on a few steps per stage: every stage runs from the previous one's
final/, the report card is filled from measured values, and a second run trains nothing again."""

import json
import re

import pytest

from minillm.cli import main
from minillm.evaluation.word_problems import word_problem_accuracy
from minillm.inference.generator import TextGenerator
from minillm.model import MiniGPT
from minillm.quickstart import STAGES, run_quickstart
from minillm.recipes.config import RunConfigError
from minillm.tokenizer import BPETokenizer

FEW_STEPS = ["pretrain.max_steps=30", "pretrain.eval_every=15", "pretrain.data.num_documents=1500",
             "pretrain.tokenizer.train_documents=1500", "sft.max_steps=8", "sft.data.num_documents=200",
             "dpo.max_steps=4", "dpo.data.num_documents=120", "grpo.max_steps=4", "grpo.data.num_documents=100",
             "grpo.eval_every=4", "grpo.rollout.max_new_tokens=16"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    return out, run_quickstart(out, FEW_STEPS, problems=12)


def test_every_stage_starts_from_the_previous_ones_final(quickstart):
    out, report = quickstart
    assert list(report["stages"]) == [s.name for s in STAGES]
    for stage in STAGES:
        config = json.loads((out / stage.name / "result.json").read_text())
        assert config["steps"] == {"pretrain": 30, "sft": 8, "dpo": 4, "grpo": 4}[stage.name]
        run_config = (out / stage.name / "config.yaml").read_text()
        expected = "null" if stage.init_from is None else str(out / stage.init_from / "final")
        assert re.search(rf"^init_from: '?{re.escape(expected)}'?$", run_config, re.M), run_config


def test_report_card_is_filled_from_measured_values(quickstart):
    out, report = quickstart
    text = (out / "report.md").read_text()
    for section in ("## Stages", "## Environment", "## Sample conversations", "## Training curves"):
        assert section in text
    rows = {m[0]: m for m in re.findall(r"^\| (\w+) \| `(\w+)` \| ([^|]+) \| (\d+) \| ([\d,]+) \| ([^|]+) \| "
                                          r"([\d.]+) \(([\d.]+)\), [\d.]+% \| ([\d.]+)% \| ([^|]+) \|$", text, re.M)}
    assert set(rows) == {"pretrain", "sft", "dpo", "grpo"}
    for name, row in rows.items():
        stage = report["stages"][name]
        assert int(row[3]) == stage["result"]["steps"] and int(row[4].replace(",", "")) == stage["result"]["tokens"]
        assert float(row[8]) == pytest.approx(100 * stage["evaluation"]["accuracy"], abs=0.05)
        assert float(row[6]) == pytest.approx(stage["evaluation"]["heldout_text_loss"], abs=5e-4)
    dpo_change = float(rows["dpo"][9].split()[0])
    assert dpo_change == pytest.approx(float(rows["dpo"][8]) - float(rows["sft"][8]), abs=0.11)
    # every embedded plot exists
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert images and all((out / image).is_file() for image in images)
    assert "| torch |" in text and "| precision |" in text


def test_accuracy_in_the_report_is_the_models_own(quickstart):
    """Recomputed from the saved SFT model, outside the pipeline."""
    out, report = quickstart
    directory = out / "sft" / "final"
    generator = TextGenerator(MiniGPT.from_pretrained(directory).eval(), BPETokenizer.from_pretrained(directory))
    accuracy, answers = word_problem_accuracy(generator, 12, chat=True)
    assert accuracy == report["stages"]["sft"]["evaluation"]["accuracy"]
    assert answers[0].strip() == report["stages"]["sft"]["evaluation"]["examples"][0]["answer"]


def test_a_second_run_trains_nothing_again(quickstart, capsys):
    out, report = quickstart
    weights = out / "grpo" / "final" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert main(["quickstart", "--out-dir", str(out), "--problems", "12", "--no-chat", *FEW_STEPS]) == 0
    assert f"report card: {out / 'report.md'}" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == before
    again = json.loads((out / "report.json").read_text())
    assert again["stages"]["dpo"]["evaluation"] == report["stages"]["dpo"]["evaluation"]


def test_overrides_name_a_stage(tmp_path):
    with pytest.raises(RunConfigError, match="STAGE.key=value"):
        run_quickstart(tmp_path, ["max_steps=3"])
    with pytest.raises(RunConfigError, match="sft.init_from"):
        run_quickstart(tmp_path, ["sft.init_from=elsewhere"])
