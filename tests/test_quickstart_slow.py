"""`minillm quickstart` end to end (slow: a couple of minutes on a 2-core CPU)."""

import pytest

from minillm.cli import main
from minillm.model import MiniGPT


@pytest.mark.slow
def test_quickstart_trains_a_model_that_writes_like_the_corpus(tmp_path, capsys):
    assert main(["quickstart", "--out-dir", str(tmp_path), "--minutes", "1.5"]) == 0
    out = capsys.readouterr().out
    assert "[3/3] samples" in out and "held-out word problems" in out
    model = MiniGPT.from_pretrained(tmp_path / "final")
    assert model.num_parameters() > 4_000_000
    metrics = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert metrics, "validation ran"
    # The validation loss line: "validation loss X nats/token (...); a context-free unigram model scores Y"
    line = next(line for line in out.splitlines() if line.startswith("validation loss"))
    val_loss = float(line.split()[2])
    unigram = float(line.rsplit(" ", 1)[1])
    assert val_loss < 0.5 * unigram, line
