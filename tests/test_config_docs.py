"""The getting-started guide's reference of run-config keys is checked against the schema it describes
(`minillm.recipes.config`): every key it names exists in that section, the small sections are listed in
full, and the stages and distributed modes it names are the allowed ones."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from minillm.recipes.config import STAGES, DataSection, RunConfig, TokenizerSection, objective_options
from minillm.training.distributed import MODES
from minillm.training.memory import MemoryConfig
from minillm.training.trainer import TrainingConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"
SECTIONS = {  # the bullet's leading key → every key that section accepts, and whether all must be listed
    "tokenizer": (set(TokenizerSection.model_fields), True),
    "data": (set(DataSection.model_fields) - {"identity"}, False),
    "training": ({f.name for f in dataclasses.fields(TrainingConfig)}, False),
    "memory": ({f.name for f in dataclasses.fields(MemoryConfig)}, True),
    "objective": (set(objective_options("dpo")) | set(objective_options("reward")), False),
}


def reference(document: Path) -> dict[str, list[str]]:
    """The bullets after the guide's pretraining example: {section (or "top"): the backticked names}."""
    found = {}
    for line in document.read_text(encoding="utf-8").splitlines():
        match = re.match(r"- `(\w+):`", line)
        names = re.findall(r"`([\w.]+)`", line)
        if match:
            found[match.group(1)] = names
        elif line.startswith("- ") and "`stage`" in line:
            found["top"] = names
    return found


@pytest.mark.parametrize("name", ["getting-started.md", "getting-started_en.md"])
def test_the_guides_config_reference_matches_the_schema(name):
    found = reference(DOCS / name)
    assert set(SECTIONS) | {"top", "model"} <= set(found), sorted(found)
    for section, (keys, complete) in SECTIONS.items():
        named = {n for n in found[section] if not n.isupper() and n not in ("MemoryConfig",)}
        values = {"zh", "en", "both"} if section == "data" else set()
        assert named - values <= keys, (section, sorted(named - values - keys))
        if complete:
            assert keys <= named, (section, sorted(keys - named))
    top = set(found["top"])
    assert set(STAGES) <= top and set(MODES) <= top
    assert {k for k in RunConfig.model_fields if k not in SECTIONS and k not in ("model", "rollout", "reward")} <= top
