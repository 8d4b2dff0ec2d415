#!/usr/bin/env bash
# Set-up, build, and pretrain: a tiny LLaMA-style GPT, then a tiny MoE, each data-parallel on NP
# ranks under mpirun, on text Debian ships: the fortunes (many short documents) blended with the
# licence texts (a few long ones), tokenised byte-level by tools/preprocess_data into Megatron
# .bin/.idx files. Ends with a summary; fails if a loss did not fall clearly.
source "$(dirname "$0")/common.sh"
loom_setup_and_build
NP="${NP:-2}"
OUT="${DEMO_DIR:-logs/demo}"
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== preparing the demo corpus (data/demo)"
loom_demo_corpus

run() {  # name binary config [extra --set ...]
  local name="$1" bin="$2" config="$3"
  shift 3
  echo "== $name: mpirun -np $NP $bin --config $config $*"
  loom_mpirun -np "$NP" "build/cpu/examples/$bin" --config "$config" \
    --set logging.dir="$OUT/$name" --set train.checkpoint_dir="$OUT/$name/checkpoints" \
    --set train.progress=lines "$@" 2>&1 | grep -v -E '^\s|^config:|^[a-z_]+ \{|^\}' | cut -c1-220
}

run tiny_gpt gpt_pretrain configs/demo_text.pbtxt --set train.steps="${STEPS:-150}" "$@"
run tiny_moe moe_pretrain configs/demo_text.pbtxt --set train.steps="${STEPS:-150}" \
  --set model.moe.expert_ffn_hidden_size=128 --set model.moe.num_shared_experts=1 \
  --set model.moe.z_loss_coeff=0.001 "$@"

# Summary from the metrics files: first and last training loss, last eval, throughput.
python3 - "$OUT" <<'PY'
import json, math, sys, os
out = sys.argv[1]
ok = True
print("\n== summary")
print(f"{'job':10} {'steps':>5} {'first loss':>10} {'last loss':>10} {'eval loss':>10} {'eval ppl':>9} {'tok/s':>8} {'MFU':>6}")
for name in ("tiny_gpt", "tiny_moe"):
    rows = [json.loads(l) for l in open(os.path.join(out, name, "metrics.jsonl"))]
    train = [r for r in rows if r["type"] == "train"]
    evals = [r for r in rows if r["type"] == "eval"]
    first, last = train[0]["loss"], train[-1]["loss"]
    tps = sum(r["tokens_per_s"] for r in train[1:]) / max(1, len(train) - 1)
    mfu = sum(r["mfu"] for r in train[1:]) / max(1, len(train) - 1)
    ev = evals[-1] if evals else {"loss": float("nan"), "perplexity": float("nan")}
    print(f"{name:10} {train[-1]['step']:5d} {first:10.4f} {last:10.4f} {ev['loss']:10.4f} {ev['perplexity']:9.2f} {tps:8.0f} {mfu*100:5.1f}%")
    # Bytes start at ~ln(320) = 5.77 nats; learning English text brings the loss below half of that.
    if not (last < 0.5 * first):
        print(f"   {name}: the loss did not fall clearly ({first:.3f} -> {last:.3f})")
        ok = False
print("checkpoints and metrics under", out)
sys.exit(0 if ok else 1)
PY
