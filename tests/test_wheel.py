"""The package as users install it: a wheel built from this repository, installed into a fresh virtual
environment outside the repository, runs `minillm train --config pretrain_tiny` from the configs it
ships, with no file of the repository in reach."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_an_installed_wheel_trains_from_its_shipped_config(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    [wheel] = dist.glob("mini_llm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "minillm/configs/pretrain_tiny.yaml" in names and "minillm/serving/static/index.html" in names

    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    # The dependencies (torch, tokenizers, ...) come from this interpreter's environment, appended after the
    # fresh environment's own site-packages; the package itself only from the wheel.
    (purelib / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=600)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "MINILLM_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": ""}
    where = subprocess.run([str(python), "-c", "import minillm; print(minillm.__file__)"], cwd=work, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(purelib), where
    run = subprocess.run([str(env_dir / "bin" / "minillm"), "train", "--config", "pretrain_tiny", "--max-steps", "2",
                          "--precision", "fp32", "data.num_documents=40", "tokenizer.vocab_size=300",
                          "training.progress=false", "--out-dir", "run"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "run" / "final" / "model.safetensors").is_file()
    assert not (work / "configs").exists()
