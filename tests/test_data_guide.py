"""The examples in docs/data.md and docs/data_en.md load as the guide says they do."""

import json
import re
from pathlib import Path

import pytest

from minillm.data.formats import detect_schema, to_conversation, to_preference

DOCS = Path(__file__).resolve().parents[1] / "docs"


def json_blocks(name: str) -> list[list[dict]]:
    text = (DOCS / name).read_text(encoding="utf-8")
    return [[json.loads(line) for line in block.strip().splitlines()]
            for block in re.findall(r"```json\n(.*?)```", text, re.S)]


@pytest.mark.parametrize("name", ["data.md", "data_en.md"])
def test_every_example_of_a_kind_gives_the_same_record(name):
    conversations, preferences, labelled = json_blocks(name)
    assert len({to_conversation(r) for r in conversations}) == 1
    assert [detect_schema(r)[1] for r in conversations] == ["messages", "minimind", "sharegpt", "alpaca"]
    assert len({to_preference(r) for r in preferences}) == 1
    assert [detect_schema(r)[0] for r in preferences] == ["preference"] * 4
    assert detect_schema(labelled[0]) == ("labelled", "labelled")
