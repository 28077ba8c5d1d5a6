"""PPO and GRPO trainers: rollouts, learning a reward, exact resume mid-rollout, rewards from functions and
reward models, the ppo/grpo stages, the prompt schema, and the RLHF pipeline."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from minillm.cli import main
from minillm.data.builtin import builtin_preference_pairs, builtin_rl_prompts
from minillm.data.formats import DataError, Message, PromptRecord, load_records
from minillm.data.preference import PreferenceDataset
from minillm.model import MiniGPT, MiniGPTConfig
from minillm.model.heads import VALUE_HEAD_FILE, MiniGPTRewardModel
from minillm.recipes.rlhf import RLHFPipeline
from minillm.rl import GRPOTrainer, PPOTrainer, RewardModelScorer, RolloutConfig
from minillm.rl.reward import compute_rewards
from minillm.training import TrainingConfig
from minillm.training.objectives import RewardObjective, stack_pairs


def small_model(tokenizer, seed: int = 0) -> MiniGPT:
    torch.manual_seed(seed)
    return MiniGPT(MiniGPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128))


def digit_share(prompts, completions, **_):
    """Toy reward: the share of a reply's characters that are digits (a random model writes a few)."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def train_config(tmp_path=None, **overrides) -> TrainingConfig:
    values = dict(batch_size=8, max_steps=6, lr=1e-3, precision="fp32", progress=False, warmup_steps=0,
                  min_lr_ratio=1.0, weight_decay=0.0, log_every=1, eval_every=0)
    if tmp_path is not None:
        values["out_dir"] = str(tmp_path)
    return TrainingConfig(**{**values, **overrides})


def rollout_rewards(out_dir) -> list[float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["rollout/reward"] for r in rows if "rollout/reward" in r]


# ---------------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("trainer_class", [GRPOTrainer, PPOTrainer])
def test_rl_raises_the_reward_it_is_given(trainer_class, tokenizer, tmp_path):
    """A random model rewarded for digits writes more digits: the mean rollout reward of the last rollouts
    is well above the first ones, while the KL to the reference stays bounded."""
    prompts = builtin_rl_prompts(400, seed=3)
    grpo = trainer_class is GRPOTrainer
    rollout = RolloutConfig(prompts_per_rollout=4 if grpo else 16, samples_per_prompt=4 if grpo else 1,
                            max_new_tokens=12)
    options = dict(beta=0.04) if grpo else dict(kl_coef=0.01)
    trainer = trainer_class(small_model(tokenizer), tokenizer, train_config(tmp_path, max_steps=40, lr=1e-2,
                                                                            batch_size=16),
                            prompts=prompts, reward_functions=[digit_share], rollout=rollout, **options)
    trainer.train()
    rewards = rollout_rewards(tmp_path)  # one rollout per step
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    # measured: GRPO 0.02 -> 0.91, PPO 0.02 -> 0.56 (digits are ~2% of a random model's characters)
    assert first < 0.1 and last > first + 0.2, (first, last)


@pytest.mark.parametrize("trainer_class", [GRPOTrainer, PPOTrainer])
def test_the_kl_penalty_holds_the_policy_near_the_reference(trainer_class, tokenizer, tmp_path):
    """The same digit-reward run with and without the KL term (both measure the KL of their rollouts to
    the starting model): with it, the policy ends much closer to the reference."""
    grpo = trainer_class is GRPOTrainer
    kl = {}
    for coef in (0.0, 1.0):
        out = tmp_path / str(coef)
        options = dict(beta=coef) if grpo else dict(kl_coef=coef, kl_estimator="k3")
        trainer = trainer_class(small_model(tokenizer), tokenizer, train_config(out, max_steps=25, lr=1e-2,
                                                                                batch_size=16),
                                prompts=builtin_rl_prompts(200, seed=3), reward_functions=[digit_share],
                                rollout=RolloutConfig(prompts_per_rollout=4 if grpo else 16,
                                                      samples_per_prompt=4 if grpo else 1, max_new_tokens=12),
                                ref_model=small_model(tokenizer), **options)
        trainer.train()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        kl[coef] = sum(r["rollout/kl"] for r in rows[-5:]) / 5
    assert kl[1.0] < 0.5 * kl[0.0], kl


# ---------------------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("trainer_class", [GRPOTrainer, PPOTrainer])
def test_resume_mid_rollout_is_exact(trainer_class, tokenizer, tmp_path):
    """A rollout gives 4 optimizer steps (2 epochs × 2 minibatches); saving at step 3 cuts one in half. A new
    trainer resumed from step_3/ ends bitwise equal to the run that never stopped, value head included."""
    prompts = builtin_rl_prompts(64, seed=4)
    rollout = RolloutConfig(prompts_per_rollout=4, samples_per_prompt=4,
                            max_new_tokens=10, epochs=2)

    def make(out):
        return trainer_class(small_model(tokenizer), tokenizer, train_config(out, save_every=3, keep_last=5,
                                                                             max_steps=7, eval_every=0),
                             prompts=prompts, reward_functions=[digit_share], rollout=rollout)

    full = make(tmp_path / "full")
    full.train()
    assert (tmp_path / "full" / "step_3" / "trainer_state" / "loader.pt").is_file()
    assert torch.load(tmp_path / "full" / "step_3" / "trainer_state" / "loader.pt") is not None  # mid-rollout
    resumed = make(tmp_path / "resumed")
    resumed.resume(tmp_path / "full" / "step_3")
    resumed.train()
    for (name, a), b in zip(full.base_model.state_dict().items(), resumed.base_model.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------- checks and rewards
def test_rl_refuses_what_cannot_work(tokenizer):
    prompts = builtin_rl_prompts(32, seed=0)
    model = small_model(tokenizer)
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 2"):
        GRPOTrainer(model, tokenizer, train_config(), prompts=prompts, rollout=RolloutConfig(samples_per_prompt=1))
    with pytest.raises(ValueError, match="must split into optimizer steps"):
        GRPOTrainer(model, tokenizer, train_config(batch_size=5), prompts=prompts,
                    rollout=RolloutConfig(prompts_per_rollout=2, samples_per_prompt=4))
    with pytest.raises(ValueError, match="not supported yet"):
        GRPOTrainer(model, tokenizer, train_config(), prompts=prompts, distributed="ddp")
    with pytest.raises(ValueError, match="fewer than prompts_per_rollout"):
        GRPOTrainer(model, tokenizer, train_config(), prompts=prompts[:3], rollout=RolloutConfig(samples_per_prompt=2))
    with pytest.raises(ValueError, match="reward function 'nope'"):
        GRPOTrainer(model, tokenizer, train_config(), prompts=prompts, reward_functions=["nope"])
    with pytest.raises(TypeError, match="language model"):
        PPOTrainer(MiniGPTRewardModel(model.config), tokenizer, train_config(), prompts=prompts)
    with pytest.raises(ValueError, match="temperature must be positive"):
        RolloutConfig(temperature=0)


def test_reward_functions_are_checked_and_named():
    def short(prompts, completions, **_):
        return [1.0]

    with pytest.raises(ValueError, match="short returned 1 values for 2 completions"):
        compute_rewards([short], [1.0], [[], []], ["a", "b"], {})

    def nan(prompts, completions, **_):
        return [float("nan")] * len(completions)

    with pytest.raises(ValueError, match="nan returned NaN"):
        compute_rewards([nan], [1.0], [[]], ["a"], {})
    total, means = compute_rewards([digit_share, lambda p, c, answer: [float(a) for a in answer]], [2.0, 1.0],
                                   [[], []], ["12ab", "xyz"], {"answer": [3, 4]})
    assert total.tolist() == pytest.approx([2 * 0.5 + 3, 4.0])
    assert means["rewards/digit_share"] == pytest.approx(0.25)


def test_the_reward_model_scorer_scores_as_the_reward_model_was_trained(tokenizer):
    """A completion scored by `RewardModelScorer` gets exactly the reward its preference pair's chosen
    sequence gets in reward-model training (same chat-template rendering, last token)."""
    torch.manual_seed(0)
    model = MiniGPTRewardModel(small_model(tokenizer).config).eval()
    pairs = builtin_preference_pairs(4, seed=2)
    dataset = PreferenceDataset(pairs, tokenizer, max_length=128)
    batch = {k: torch.nn.utils.rnn.pad_sequence([item[k] for item in dataset.items], batch_first=True,
                                                padding_value=-100 if k.endswith("labels") else 0)
             for k in dataset.items[0]}
    for side in ("chosen", "rejected"):
        batch[f"{side}_attention_mask"] = (torch.arange(batch[f"{side}_input_ids"].shape[1])[None]
                                           < torch.tensor([len(i[f"{side}_input_ids"]) for i in dataset.items])[:, None]).long()
    assert stack_pairs(batch)[0].shape[0] == 8
    chosen, _ = RewardObjective().rewards(model, batch)
    scorer = RewardModelScorer(model, tokenizer, batch_size=3)
    scores = scorer([[m.to_dict() for m in p.prompt] for p in pairs], [p.chosen for p in pairs])
    torch.testing.assert_close(torch.tensor(scores), chosen, atol=1e-5, rtol=0)


def test_prompt_records_keep_their_fields_and_bad_ones_name_the_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "2 + 3 = ?", "answer": 5}\n'
                    '{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}\n'
                    '{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
                    encoding="utf-8")
    with pytest.raises(DataError, match=r"prompts.jsonl:3: .*must end with a user turn"):
        load_records(path, kind="prompt")
    result = load_records(path, kind="prompt", skip_bad=True)
    assert result.records[0] == PromptRecord((Message("user", "2 + 3 = ?"),), {"answer": 5})
    assert [m.role for m in result.records[1].prompt] == ["system", "user"]
    assert len(result.skipped) == 1


# ---------------------------------------------------------------------------------------- stages and pipeline
@pytest.fixture()
def sft_checkpoint(tokenizer, tmp_path):
    directory = tmp_path / "sft"
    small_model(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


TINY_RL = ["max_steps=4", "eval_every=2", "save_every=2", "precision=fp32", "training.progress=false",
           "training.batch_size=4", "rollout.prompts_per_rollout=4", "rollout.max_new_tokens=8",
           "data.num_documents=60", "data.val_fraction=0.1"]


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_the_rl_stages_run_from_a_config_and_resume(stage, sft_checkpoint, tmp_path):
    out = tmp_path / stage
    group = ["rollout.samples_per_prompt=2"] if stage == "grpo" else []
    args = ["train", "--config", f"{stage}_tiny", "--out-dir", str(out), f"init_from={sft_checkpoint}",
            *TINY_RL, *group]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_reward" in r for r in rows) and any("rollout/reward" in r for r in rows)
    final = out / "final"
    assert MiniGPT.from_pretrained(final)  # the policy loads as a plain model (chat, export)
    assert (final / VALUE_HEAD_FILE).is_file() == (stage == "ppo")
    if stage == "ppo":
        assert not any(k.startswith("v_head") for k in load_file(str(final / "model.safetensors")))
    # resuming from step_2 reaches the same final weights
    again = tmp_path / f"{stage}_again"
    assert main([*args[:4], str(again), *args[5:], "max_steps=2"]) == 0
    assert main([*args[:4], str(again), *args[5:], "--resume", "latest"]) == 0
    for key, value in load_file(str(final / "model.safetensors")).items():
        assert torch.equal(value, load_file(str(again / "final" / "model.safetensors"))[key]), key


def test_rl_stage_config_errors_name_the_key(sft_checkpoint, tmp_path, capsys):
    base = ["train", "--config", "grpo_tiny", "--out-dir", str(tmp_path / "x")]
    for extra, message in ((["init_from=null"], "needs init_from"),
                           ([f"init_from={sft_checkpoint}", "rollout.top_p=2"], "rollout: top_p"),
                           ([f"init_from={sft_checkpoint}", "rollout.bogus=1"], "unknown key .rollout.bogus"),
                           ([f"init_from={sft_checkpoint}", "objective.kl_coef=1"], "objective.kl_coef"),
                           ([f"init_from={sft_checkpoint}", "reward.functions=answer"], "reward.functions")):
        assert main([*base, *extra]) != 0
        assert re.search(message, capsys.readouterr().err), message


def test_the_rlhf_pipeline_chains_sft_reward_and_ppo_and_resumes(sft_checkpoint, tmp_path):
    """One config: SFT from the given model, a reward model from SFT's final/, PPO from SFT's final/
    scored by that reward model. Run again, finished stages are skipped; a stopped stage resumes."""
    out = tmp_path / "rlhf"
    tiny = {"max_steps": 2, "eval_every": 0, "save_every": 1, "precision": "fp32",
            "training": {"progress": False, "batch_size": 4}, "data": {"num_documents": 40, "max_length": 64}}
    ppo = {**tiny, "rollout": {"prompts_per_rollout": 4, "max_new_tokens": 6},
           "data": {"num_documents": 40, "val_fraction": 0.1}}
    pipeline = RLHFPipeline(out, sft_checkpoint, {"sft": tiny, "reward": tiny, "ppo": ppo})
    assert pipeline.configs["ppo"]["reward"]["model"] == str(out / "reward" / "final")
    assert pipeline.configs["reward"]["init_from"] == str(out / "sft" / "final")
    results = pipeline.run()
    assert set(results) == {"sft", "reward", "ppo"}
    ppo_rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert "rollout/rewards/reward_model" in ppo_rows[0]
    final_ppo = load_file(str(out / "ppo" / "final" / "model.safetensors"))
    # stop PPO half-way (as a kill would leave it) and run the pipeline again: SFT and reward are skipped
    (out / "ppo" / "result.json").unlink()
    shutil.rmtree(out / "ppo" / "final")
    shutil.rmtree(out / "ppo" / "step_2")
    stamp = (out / "sft" / "final" / "model.safetensors").stat().st_mtime_ns
    RLHFPipeline(out, sft_checkpoint, {"sft": tiny, "reward": tiny, "ppo": ppo}).run()
    assert (out / "sft" / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    for key, value in load_file(str(out / "ppo" / "final" / "model.safetensors")).items():
        assert torch.equal(value, final_ppo[key]), key


def test_a_pipeline_config_runs_from_the_command_line(sft_checkpoint, tmp_path, capsys):
    config = tmp_path / "rlhf.yaml"
    config.write_text(f"""stage: rlhf
out_dir: {tmp_path / 'run'}
init_from: {sft_checkpoint}
precision: fp32
sft: {{max_steps: 1, eval_every: 0, training: {{progress: false, batch_size: 4}}, data: {{num_documents: 30}}}}
reward: {{max_steps: 1, eval_every: 0, training: {{progress: false, batch_size: 4}}, data: {{num_documents: 30}}}}
ppo: {{max_steps: 1, eval_every: 0, training: {{progress: false, batch_size: 4}},
      rollout: {{prompts_per_rollout: 4, max_new_tokens: 4, epochs: 1}}, data: {{num_documents: 30}}}}
""", encoding="utf-8")
    assert main(["train", "--config", str(config), "ppo.seed=7"]) == 0
    assert (tmp_path / "run" / "ppo" / "final" / VALUE_HEAD_FILE).is_file()
    assert main(["train", "--config", str(config), "--lr", "0.1"]) == 2
    assert "cannot apply to a pipeline" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"stage: rlhf\ninit_from: {sft_checkpoint}\ndpo: {{}}\n", encoding="utf-8")
    assert main(["train", "--config", str(bad)]) != 0
    assert "unknown key(s) dpo" in capsys.readouterr().err
