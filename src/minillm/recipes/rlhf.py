"""RLHF in one call: SFT → reward model → PPO, each stage's output the next one's input.

    RLHFPipeline.from_config("rlhf_tiny").run()        # or: minillm train --config rlhf_tiny

A pipeline config has `stage: rlhf`, `out_dir`, `init_from` (the pretrained model SFT starts from), and
a section per stage (`sft`, `reward`, `ppo`), each a run config of its own: `config:` names the file it
starts from (default `{stage}_tiny`) and any other key overrides it, as `key=value` overrides would.
Shared keys given at the top (`seed`, `precision`) apply to every stage unless a stage sets its own.

The wiring: SFT trains `init_from` into `out_dir/sft`; the reward model starts from `sft/final` into
`out_dir/reward`; PPO starts from `sft/final`, scored by `reward/final` (plus any `reward.functions` the
ppo section names), into `out_dir/ppo`. A stage that finished wrote `result.json` and is skipped when
the pipeline runs again; a stage that was stopped resumes from its newest checkpoint, exactly.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from minillm.recipes.config import RunConfigError, load_run_config, load_yaml, resolve_config_path
from minillm.recipes.run import run_stage

logger = logging.getLogger("minillm.rl")

__all__ = ["PIPELINE_STAGES", "RLHFPipeline", "is_pipeline_config"]

PIPELINE_STAGES = ("sft", "reward", "ppo")
_TOP_KEYS = {"stage", "out_dir", "init_from", "seed", "precision", *PIPELINE_STAGES}
_SHARED_KEYS = ("seed", "precision")


def is_pipeline_config(path: str | Path | None) -> bool:
    """Whether the run config at `path` is an RLHF pipeline (`stage: rlhf`)."""
    if path is None:
        return False
    try:
        loaded = load_yaml(resolve_config_path(path).read_text(encoding="utf-8"))
    except (RunConfigError, OSError, ValueError):  # the run config loader reports it
        return False
    return isinstance(loaded, dict) and loaded.get("stage") == "rlhf"


class RLHFPipeline:
    """SFT → reward model → PPO (see the module docstring). `stages` maps a stage name to its run
    config overrides (a `config` key names the base config)."""

    def __init__(self, out_dir: str | Path, init_from: str | Path, stages: dict[str, dict[str, Any]] | None = None,
                 shared: dict[str, Any] | None = None, source: str = "RLHFPipeline") -> None:
        stages = copy.deepcopy(stages or {})
        unknown = set(stages) - set(PIPELINE_STAGES)
        if unknown:
            raise RunConfigError(f"{source}: unknown pipeline stage(s) {', '.join(sorted(unknown))}; the stages are "
                                 f"{', '.join(PIPELINE_STAGES)}")
        for name, section in stages.items():
            if not isinstance(section, dict):
                raise RunConfigError(f"{source}: '{name}' must be a mapping of run config keys")
            for key in ("stage", "out_dir", "init_from"):
                if key in section:
                    raise RunConfigError(f"{source}: '{name}.{key}' is set by the pipeline (each stage starts "
                                         "from the previous stage's final/); remove it")
        if not init_from:
            raise RunConfigError(f"{source}: init_from (the pretrained model SFT starts from) is required")
        self.out_dir, self.init_from = Path(out_dir), Path(init_from)
        self.stages, self.shared, self.source = stages, dict(shared or {}), source
        self.configs = {name: self._stage_config(name) for name in PIPELINE_STAGES}  # fail early on a bad one

    @classmethod
    def from_config(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RLHFPipeline:
        """A pipeline from a YAML file (or a shipped config name); `overrides` as `key=value`, where the
        key is a top-level key (`out_dir=…`) or reaches into a stage (`ppo.max_steps=50`)."""
        resolved = resolve_config_path(path)
        loaded = load_yaml(resolved.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict) or loaded.get("stage") != "rlhf":
            raise RunConfigError(f"{resolved}: not a pipeline config (it needs stage: rlhf)")
        unknown = set(loaded) - _TOP_KEYS
        if unknown:
            raise RunConfigError(f"{resolved}: unknown key(s) {', '.join(sorted(unknown))}; a pipeline config has "
                                 f"{', '.join(sorted(_TOP_KEYS))}")
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise RunConfigError(f"override {item!r} must look like key=value (e.g. ppo.max_steps=50)")
            head, _, rest = key.partition(".")
            if head in PIPELINE_STAGES and rest:
                loaded.setdefault(head, {}).setdefault("overrides", []).append(f"{rest}={raw}")
            elif head in _TOP_KEYS - set(PIPELINE_STAGES) and not rest:
                loaded[head] = load_yaml(raw)
            else:
                raise RunConfigError(f"override {item!r}: use a top-level key (out_dir, init_from, seed, precision) "
                                     f"or STAGE.key with STAGE one of {', '.join(PIPELINE_STAGES)}")
        return cls(loaded.get("out_dir") or "runs/rlhf", loaded.get("init_from"),
                   {name: loaded.get(name) or {} for name in PIPELINE_STAGES},
                   {k: loaded[k] for k in _SHARED_KEYS if k in loaded}, source=str(resolved))

    def stage_dir(self, name: str) -> Path:
        return self.out_dir / name

    def _stage_config(self, name: str) -> dict[str, Any]:
        section = copy.deepcopy(self.stages.get(name, {}))
        base = section.pop("config", f"{name}_tiny")
        overrides = section.pop("overrides", [])
        values = {**{k: v for k, v in self.shared.items() if k not in section}, **section}
        values["out_dir"] = str(self.stage_dir(name))
        values["init_from"] = str(self.init_from if name == "sft" else self.stage_dir("sft") / "final")
        if name == "ppo":
            reward = dict(values.get("reward") or {})
            reward["model"] = str(self.stage_dir("reward") / "final")
            reward.setdefault("functions", [])
            values["reward"] = reward
        values["resume"] = None
        try:
            config = load_run_config(base, overrides, values)
        except RunConfigError as e:
            raise RunConfigError(f"{self.source}: stage {name}: {e}") from None
        if config["stage"] != name:
            raise RunConfigError(f"{self.source}: stage {name}: its config {base} is a {config['stage']} config")
        return config

    def run(self) -> dict[str, dict[str, Any]]:
        """Run every stage not yet done, in order; returns each stage's result."""
        results = {}
        for name in PIPELINE_STAGES:
            logger.info("rlhf: stage %s → %s", name, self.stage_dir(name))
            results[name] = run_stage(self.configs[name])
        return results
