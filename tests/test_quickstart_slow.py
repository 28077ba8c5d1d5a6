"""`minillm quickstart` end to end: the whole pipeline with the shipped configs and its report card
(slow: about 8 minutes on a 2-core CPU)."""

import json
import re

import pytest

from minillm.cli import main


@pytest.mark.slow
def test_quickstart_report_card(tmp_path, capsys):
    assert main(["quickstart", "--out-dir", str(tmp_path), "--no-chat"]) == 0
    out = capsys.readouterr().out
    assert "report card:" in out
    report = json.loads((tmp_path / "report.json").read_text())
    text = (tmp_path / "report.md").read_text()
    stages = report["stages"]
    assert list(stages) == ["pretrain", "sft", "dpo", "grpo"]
    for name, stage in stages.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert f"{100 * stage['evaluation']['accuracy']:.1f}%" in row
        assert stage["result"]["tokens"] > 0 and stage["result"]["steps"] > 0
        assert (tmp_path / name / "plots" / "loss.png").is_file()
    # the pretrained model beats a context-free model on held-out text by a wide margin
    assert stages["pretrain"]["evaluation"]["heldout_text_loss"] < 0.5 * report["unigram_entropy"]
    # SFT teaches the chat format: held-out accuracy well above zero (44.5% measured with these configs)
    assert stages["sft"]["evaluation"]["accuracy"] >= 0.25
    # DPO's and GRPO's change is reported against SFT, whatever its sign
    for name in ("dpo", "grpo"):
        change = (stages[name]["evaluation"]["accuracy"] - stages["sft"]["evaluation"]["accuracy"]) * 100
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert f"{change:+.1f} pts" in row
    assert all(turn["assistant"] for turn in stages["sft"]["evaluation"]["conversations"])
    assert re.search(r"\| precision \| \w+ \|", text)
