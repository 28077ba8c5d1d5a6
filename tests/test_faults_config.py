"""Fault suite, run configs and `minillm train` flags: every bad value is refused before any data is read,
with exit status 2 and one line naming where it came from (file and line, flag or override), the key, the
value and what is allowed."""

from __future__ import annotations

import pytest

from minillm.cli import main
from minillm.recipes.config import RunConfigError, load_run_config

# (id, YAML file text, what the one error line must contain). The file is `cfg.yaml`; `:N` is its line.
CONFIG_FILES = [
    ("max-steps-string", "stage: pretrain\nmax_steps: ten\n", ["cfg.yaml:2", "max_steps='ten'"]),
    ("batch-size-fraction", "training:\n  batch_size: 2.5\n", ["cfg.yaml:2", "training.batch_size=2.5", "int"]),
    ("batch-size-negative", "training:\n  batch_size: -4\n", ["cfg.yaml:2", "batch_size must be at least 1"]),
    ("batch-size-string", "training:\n  batch_size: '16'\n", ["cfg.yaml:2", "training.batch_size='16'"]),
    ("max-steps-negative", "max_steps: -1\n", ["cfg.yaml:1", "greater than or equal to 1"]),
    ("accumulation-zero", "training:\n  grad_accum_steps: 0\n", ["cfg.yaml:2", "grad_accum_steps must be at least 1"]),
    ("precision-unknown", "precision: fp8\n", ["cfg.yaml:1", "precision='fp8'", "'bf16'"]),
    ("yaml-unclosed-flow", "stage: pretrain\ntraining: {lr: 1\nseed: 3\n", ["cfg.yaml:3", "invalid YAML"]),
    ("yaml-bad-mapping", "stage: pretrain\na: b: c\n", ["cfg.yaml:2", "invalid YAML"]),
    ("yaml-tab-indent", "training:\n\tlr: 1\n", ["cfg.yaml:2", "invalid YAML"]),
    ("not-a-mapping", "- just\n- a list\n", ["cfg.yaml", "must be a mapping", "list"]),
    ("vocab-size-float", "model:\n  vocab_size: 10.5\n", ["cfg.yaml:2", "model.vocab_size=10.5"]),
    ("hidden-size-string", "model:\n  hidden_size: big\n", ["cfg.yaml:2", "model.hidden_size='big'"]),
    ("heads-do-not-divide", "model:\n  num_attention_heads: 5\n", ["cfg.yaml:2", "num_attention_heads=5 must divide"]),
    ("norm-type-unknown", "model:\n  norm_type: batchnorm\n", ["cfg.yaml:2", "norm_type='batchnorm'", "rmsnorm"]),
    ("qk-norm-not-bool", "model:\n  qk_norm: 1\n", ["cfg.yaml:2", "model.qk_norm=1", "bool"]),
    ("preset-unknown", "model:\n  preset: huge\n", ["cfg.yaml:2", "model.preset='huge'", "tiny"]),
    ("model-key-typo", "model:\n  hidden_sise: 64\n", ["cfg.yaml:2", "unknown key 'model.hidden_sise'",
                                                        "did you mean 'model.hidden_size'"]),
    ("max-length-one", "data:\n  max_length: 1\n", ["cfg.yaml:2", "data.max_length=1", "greater than or equal to 2"]),
    ("val-fraction-above-one", "data:\n  val_fraction: 1.5\n", ["cfg.yaml:2", "data.val_fraction=1.5"]),
    ("lang-unknown", "data:\n  lang: fr\n", ["cfg.yaml:2", "data.lang='fr'", "'zh'"]),
    ("skip-bad-not-bool", "data:\n  skip_bad: maybe\n", ["cfg.yaml:2", "data.skip_bad='maybe'"]),
    ("num-documents-zero", "data:\n  num_documents: 0\n", ["cfg.yaml:2", "data.num_documents=0"]),
    ("tokenizer-vocab-too-small", "tokenizer:\n  vocab_size: 100\n", ["cfg.yaml:2", "tokenizer.vocab_size=100"]),
    ("epochs-zero", "epochs: 0\n", ["cfg.yaml:1", "epochs=0", "greater than 0"]),
    ("eval-every-negative", "eval_every: -5\n", ["cfg.yaml:1", "eval_every=-5"]),
    ("seed-fraction", "seed: 1.5\n", ["cfg.yaml:1", "seed=1.5"]),
    ("distributed-unknown", "distributed: zero3\n", ["cfg.yaml:1", "distributed='zero3'", "'fsdp'"]),
    ("optimizer-unknown", "training:\n  optimizer: sgd\n", ["cfg.yaml:2", "optimizer='sgd'", "muon"]),
    ("schedule-unknown", "training:\n  lr_schedule: linear\n", ["cfg.yaml:2", "lr_schedule='linear'", "wsd"]),
    ("compile-unknown", "training:\n  compile: sometimes\n", ["cfg.yaml:2", "compile must be true, false or auto"]),
    ("momentum-out-of-range", "training:\n  muon_momentum: 1.5\n", ["cfg.yaml:2", "muon_momentum must be in [0, 1)"]),
    ("progress-not-bool", "training:\n  progress: 1\n", ["cfg.yaml:2", "training.progress=1"]),
    ("lr-string", "training:\n  lr: fast\n", ["cfg.yaml:2", "training.lr='fast'", "float"]),
    ("shared-key-in-training", "training:\n  max_steps: 5\n", ["cfg.yaml:2", "set max_steps at the top level"]),
    ("training-key-typo", "training:\n  batchsize: 5\n", ["cfg.yaml:2", "unknown key 'training.batchsize'",
                                                          "did you mean 'training.batch_size'"]),
    ("micro-batch-zero", "memory:\n  micro_batch_size: 0\n", ["cfg.yaml:2", "micro_batch_size must be a positive"]),
    ("lora-without-init", "lora:\n  rank: 4\n", ["cfg.yaml:1", "lora adapts a trained model"]),
    ("lora-rank-zero", "init_from: ckpt\nlora:\n  rank: 0\n", ["cfg.yaml:3", "rank must be an integer >= 1"]),
    ("dpo-without-init", "stage: dpo\n", ["cfg.yaml", "stage dpo needs init_from"]),
    ("dpo-beta-negative", "stage: dpo\ninit_from: ckpt\nobjective:\n  beta: -1\n",
     ["cfg.yaml:4", "beta must be positive"]),
    ("dpo-loss-unknown", "stage: dpo\ninit_from: ckpt\nobjective:\n  loss_type: hinge2\n",
     ["cfg.yaml:4", "loss_type='hinge2'"]),
    ("dpo-beta-string", "stage: dpo\ninit_from: ckpt\nobjective:\n  beta: strong\n",
     ["cfg.yaml:4", "objective.beta='strong'"]),
    ("objective-for-pretrain", "objective:\n  beta: 0.1\n", ["cfg.yaml:2", "not an option of stage pretrain"]),
    ("ppo-kl-estimator", "stage: ppo\ninit_from: ckpt\nobjective:\n  kl_estimator: k9\n",
     ["cfg.yaml:4", "kl_estimator='k9'", "k3"]),
    ("grpo-top-p", "stage: grpo\ninit_from: ckpt\nrollout:\n  top_p: 2\n", ["cfg.yaml:4", "top_p must be in (0, 1]"]),
    ("rollout-for-pretrain", "rollout:\n  max_new_tokens: 8\n", ["cfg.yaml:1", "'rollout' is for stages ppo and grpo"]),
    ("reward-functions-string", "stage: grpo\ninit_from: ckpt\nreward:\n  functions: answer\n",
     ["cfg.yaml:4", "reward.functions='answer'"]),
    ("reward-weights-count", "stage: grpo\ninit_from: ckpt\nreward:\n  functions: [answer]\n  weights: [1, 2]\n",
     ["cfg.yaml:5", "reward.weights has 2 entries for 1 reward functions"]),
    ("section-typo", "trainig:\n  lr: 1\n", ["cfg.yaml:1", "unknown key 'trainig'", "did you mean 'training'"]),
    ("section-not-mapping", "training: 5\n", ["cfg.yaml:1", "training=5"]),
    ("init-from-number", "init_from: 5\n", ["cfg.yaml:1", "init_from=5"]),
    ("stage-unknown", "stage: ppq\n", ["cfg.yaml:1", "stage='ppq'", "'grpo'"]),
    ("window-beyond-positions", "data:\n  max_length: 100000\n",
     ["data.max_length=100000 exceeds the model's max_position_embeddings"]),
    ("window-beyond-memory", "model:\n  preset: small\n  max_position_embeddings: 4000000\ndata:\n  max_length: 4000000\n"
     "training:\n  batch_size: 64\n", ["one training step needs about", "data.max_length=4000000", "GB"]),
]


def _assert_one_line_error(capsys, code: int, expected: list[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("INFO", "WARNING"))]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.mark.parametrize("text, expected", [(t, e) for _, t, e in CONFIG_FILES], ids=[i for i, _, _ in CONFIG_FILES])
def test_a_bad_config_file_is_one_line_naming_file_line_key_and_value(tmp_path, monkeypatch, capsys, text, expected):
    monkeypatch.setenv("MINILLM_CACHE_DIR", str(tmp_path / "cache"))
    config = tmp_path / "cfg.yaml"
    config.write_text(text, encoding="utf-8")
    code = main(["train", "--config", str(config), "--out-dir", str(tmp_path / "run")])
    _assert_one_line_error(capsys, code, expected)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists(), "nothing is written"


# (id, command-line arguments after `minillm train`, what the one error line must contain)
FLAGS = [
    ("batch-size-zero", ["--batch-size", "0"], ["--batch-size", "batch_size must be at least 1"]),
    ("batch-size-word", ["--batch-size", "x"], ["--batch-size", "invalid int value: 'x'"]),
    ("max-steps-negative", ["--max-steps", "-4"], ["--max-steps", "greater than or equal to 1"]),
    ("lr-negative", ["--lr", "-1"], ["--lr", "lr must be positive"]),
    ("epochs-negative", ["--epochs", "-1"], ["--epochs", "greater than 0"]),
    ("max-length-one", ["--max-length", "1"], ["--max-length", "data.max_length=1"]),
    ("precision-choice", ["--precision", "fp8"], ["--precision", "invalid choice: 'fp8'"]),
    ("optimizer-choice", ["--optimizer", "sgd"], ["--optimizer", "invalid choice: 'sgd'"]),
    ("preset-unknown", ["--preset", "huge"], ["--preset", "unknown preset"]),
    ("override-without-equals", ["maxsteps"], ["override 'maxsteps' must look like key=value"]),
    ("override-bad-value", ["training.lr=abc"], ["override 'training.lr=abc'", "training.lr='abc'"]),
    ("override-bad-yaml", ["training.lr=[1"], ["override 'training.lr=[1'", "invalid YAML"]),
    ("override-unknown-key", ["max_stepz=3"], ["unknown key 'max_stepz'", "did you mean 'max_steps'"]),
    ("config-missing", ["--config", "no_such_config"], ["config file no_such_config not found", "pretrain_tiny"]),
    ("unknown-flag-dashed-twin", ["--dry_run"], ["unrecognized arguments: --dry_run", "did you mean --dry-run"]),
    ("unknown-flag-top-key", ["--eval_every", "20"], ["unrecognized arguments: --eval_every", "did you mean eval_every=20"]),
    ("unknown-flag-section-key", ["--warmup_steps", "10"], ["--warmup_steps", "did you mean training.warmup_steps=10"]),
    ("unknown-flag-no-key", ["--frobnicate", "1"], ["unrecognized arguments: --frobnicate"]),
]


@pytest.mark.parametrize("args, expected", [(a, e) for _, a, e in FLAGS], ids=[i for i, _, _ in FLAGS])
def test_a_bad_flag_is_one_line_naming_the_flag(tmp_path, capsys, args, expected):
    try:
        code = main(["train", "--out-dir", str(tmp_path / "run"), *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    _assert_one_line_error(capsys, code, expected)


def test_a_config_that_is_not_utf8_is_named(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_bytes(b"stage: pretrain\nout_dir: \xff\xfe\n")
    _assert_one_line_error(capsys, main(["train", "--config", str(config)]), ["cfg.yaml", "not UTF-8"])


def test_library_calls_raise_the_projects_error_with_the_same_message(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("training:\n  batch_size: 2.5\n", encoding="utf-8")
    with pytest.raises(RunConfigError, match=r"cfg.yaml:2: training.batch_size=2.5"):
        load_run_config(config)


def test_model_vocab_size_that_disagrees_with_the_tokenizer_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINILLM_CACHE_DIR", str(tmp_path / "cache"))
    code = main(["train", "--out-dir", str(tmp_path / "run"), "data.num_documents=60", "tokenizer.vocab_size=300",
                 "model.vocab_size=500", "max_steps=1"])
    _assert_one_line_error(capsys, code, ["model.vocab_size=500 disagrees with the tokenizer"])


def test_dry_run_refuses_a_window_no_memory_holds(tmp_path, capsys):
    code = main(["train", "--dry-run", "model.preset=small", "model.max_position_embeddings=4000000",
                 "data.max_length=4000000", "--batch-size", "64"])
    captured = capsys.readouterr()
    assert code == 2 and "training memory estimate" in captured.out
    assert "one training step needs about" in captured.err and "Traceback" not in captured.err


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text("max_steps: ten\n", encoding="utf-8")
    with pytest.raises(RunConfigError):
        main(["train", "--config", str(config), "--debug"])
    monkeypatch.setenv("MINILLM_DEBUG", "1")
    with pytest.raises(RunConfigError):
        main(["train", "--config", str(config)])


@pytest.mark.parametrize("alias, dest, value", [
    ("--max_steps", "max_steps", 20), ("--learning_rate", "lr", 3e-4), ("--num_train_epochs", "epochs", 2.0),
    ("--per_device_train_batch_size", "batch_size", 4), ("--output_dir", "out_dir", "runs/x"),
])
def test_transformers_style_flags_are_accepted_as_aliases(alias, dest, value):
    from minillm.cli import _parser

    args = _parser().parse_args(["train", alias, str(value)])
    assert getattr(args, dest) == value
