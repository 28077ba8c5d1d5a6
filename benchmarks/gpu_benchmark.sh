#!/usr/bin/env bash
# The README's GPU table in one script (a few minutes on one H100/H200-class GPU):
#   bash benchmarks/gpu_benchmark.sh [OUT_DIR]
# 1. `minillm bench` on the gpt2 (124M) and minimind-26m presets against transformers (bf16 autocast,
#    eager and torch.compile'd): training tokens/s and MFU against the datasheet peak, decode speed;
# 2. a few hundred steps of the shipped pretraining configs configs/pretrain_gpt2.yaml and
#    configs/pretrain_minimind_26m.yaml on the built-in corpus (compile on, AdamW and Muon), whose
#    metrics.jsonl hold the logged tokens/s and MFU; a summary of both is printed at the end.
# Runs from a checkout without installing (PYTHONPATH=src) as well as from an installed package.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_benchmark}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MINILLM_CACHE_DIR=${MINILLM_CACHE_DIR:-$OUT/cache}
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

for preset in gpt2 minimind-26m; do
  timeout 240 $PY -m minillm.cli bench --preset "$preset" --compile --repeats 3 --new-tokens 128 \
    --out "$OUT/bench_$preset.json" 2>&1 | grep -v "profiler_st"
done

train() {  # name, config, extra overrides
  local name=$1 config=$2; shift 2
  timeout 200 $PY -m minillm.cli train --config "$config" --out-dir "$OUT/$name" eval_every=100 save_every=0 \
    training.progress=false training.log_every=20 training.grad_accum_steps=1 training.compile=true \
    tokenizer.train_documents=20000 data.num_documents=20000 "$@" 2>&1 | tail -n 4
}
train gpt2_adamw pretrain_gpt2 max_steps=300
train gpt2_muon pretrain_gpt2 max_steps=300 training.optimizer=muon training.lr_schedule=wsd
train minimind_adamw pretrain_minimind_26m max_steps=300
train minimind_muon pretrain_minimind_26m max_steps=300 training.optimizer=muon training.lr_schedule=wsd

$PY - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
for path in sorted(out.glob("bench_*.json")):
    for preset in json.loads(path.read_text())["presets"]:
        print(path.name, json.dumps({k: preset[k] for k in preset if k in ("preset", "training", "generation")})[:3000])
for run in sorted(p for p in out.iterdir() if (p / "metrics.jsonl").is_file()):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "tokens_per_s" in r][1:]  # the first window holds the compilation
    val = [r["val_loss"] for r in records if "val_loss" in r]
    if train:
        print(f"{run.name}: tokens/s {statistics.median(r['tokens_per_s'] for r in train):,.0f}, "
              f"MFU {statistics.median(r.get('mfu', 0) for r in train):.1%}, final val_loss {val[-1] if val else None}")
EOF
