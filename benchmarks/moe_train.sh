#!/usr/bin/env bash
# moe_train: the MoE Trainer end to end on the demo corpus (Debian's fortunes blended 0.8 : 0.2 with
# the licence texts; configs/demo_text.pbtxt with 8 experts top-2, expert FFN 128, no shared expert):
#
#  1. tokens/s at parallel.ep 1, 2 and 4 on 4 ranks (dp 4; the same model, data and global batch),
#     the mean over the steps after the first 5 of two interleaved rounds, as a ratio to ep 1;
#  2. the balance options over STEPS steps on NP ranks (2 micro-batches of 2 sequences per rank and
#     step, so the micro-batch and the global batch differ), on the demo text and on two synthetic
#     Markov chains blended alike (data.synthetic_sources 2: sources that differ in kind, where the
#     text's two are both English): no balancing (the baseline), the
#     micro-batch balance loss, the global-batch one (Qwen's), and the aux-loss-free expert bias
#     (DeepSeek-V3) - their final evaluation loss, the busiest expert's load over the mean, and the
#     expert specialisation by source (the share of each source's tokens per expert, and the mutual
#     information between a token's source and its experts) over the last log window.
#
#   benchmarks/moe_train.sh            # STEPS=300 NP=2 TPUT_STEPS=40 OUT=logs/moe_train
#
# Every rank runs one compute thread (OMP_NUM_THREADS=1, the ranks share the cores: 4 ranks on 2
# cores oversubscribe them 2 : 1); processes are not bound (--bind-to none). The tables go to
# $OUT/summary.md.
source "$(dirname "$0")/../scripts/common.sh"
if [ -d build/cpu ]; then cmake --build --preset cpu -j "$(nproc)" > /dev/null; else loom_setup_and_build; fi
STEPS="${STEPS:-300}"
NP="${NP:-2}"
TPUT_STEPS="${TPUT_STEPS:-40}"
OUT="${OUT:-logs/moe_train}"
rm -rf "$OUT"
mkdir -p "$OUT"
[ -f data/demo/licenses.idx ] || loom_demo_corpus

MODEL=(--set model.moe.num_experts=8 --set model.moe.top_k=2
  --set model.moe.expert_ffn_hidden_size=128 --set model.moe.num_shared_experts=0)

job() {  # name ranks [--set ...]
  local name="$1" np="$2"
  shift 2
  echo "== $name: $np ranks $*"
  loom_mpirun --bind-to none -np "$np" build/cpu/examples/moe_pretrain \
    --config configs/demo_text.pbtxt "${MODEL[@]}" --set logging.dir="$OUT/$name" \
    --set train.progress=off --set train.checkpoint_dir= "$@" > "$OUT/$name.log" 2>&1 ||
    { tail -20 "$OUT/$name.log"; exit 1; }
}

# Two rounds, interleaved, so that a slow spell of the machine does not land on one ep alone.
for round in 1 2; do
  for ep in 1 2 4; do
    job "ep$ep-$round" 4 --set parallel.ep=$ep --set train.steps="$TPUT_STEPS" \
      --set train.micro_batch_size=4 --set train.global_batch_size=16 --set train.eval_every=0 \
      --set train.eval_batches=1 --set train.log_every=10
  done
done

BALANCE=(--set train.steps="$STEPS" --set train.micro_batch_size=2 --set train.global_batch_size=8
  --set train.log_every=50 --set train.eval_every="$STEPS" --set train.eval_batches=8)
# The demo text, and two synthetic Markov chains blended alike (sources that differ in kind).
for corpus in text chains; do
  DATA=()
  [ "$corpus" = chains ] && DATA=(--set data.source=SYNTHETIC --set data.synthetic_sources=2)
  job "$corpus-none" "$NP" "${BALANCE[@]}" "${DATA[@]}" --set model.moe.aux_loss_coeff=0
  job "$corpus-micro" "$NP" "${BALANCE[@]}" "${DATA[@]}" --set model.moe.aux_loss_type=MICRO_BATCH
  job "$corpus-global" "$NP" "${BALANCE[@]}" "${DATA[@]}" --set model.moe.aux_loss_type=GLOBAL_BATCH
  job "$corpus-bias" "$NP" "${BALANCE[@]}" "${DATA[@]}" --set model.moe.aux_loss_coeff=0 \
    --set model.moe.bias_update_rate=0.01
done

python3 - "$OUT" "$NP" <<'PY' | tee "$OUT/summary.md"
import json, os, sys

out, np = sys.argv[1], sys.argv[2]

def records(name):
    with open(os.path.join(out, name, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]

print("### tokens/s by expert-parallel size (4 ranks, 1 thread each)\n")
print("| ep | experts per rank | tokens/s (mean of steps 6+, rounds 1 / 2) | vs ep 1 (mean) | last loss |")
print("| --- | --- | --- | --- | --- |")
base = None
for ep in (1, 2, 4):
    tps = []
    for rnd in (1, 2):
        train = [r for r in records(f"ep{ep}-{rnd}") if r["type"] == "train"]
        timed = train[5:] or train
        tps.append(sum(r["tokens_per_s"] for r in timed) / len(timed))
    mean = sum(tps) / len(tps)
    base = base or mean
    print(f"| {ep} | {8 // ep} | {mean:.0f} ({tps[0]:.0f} / {tps[1]:.0f}) | {mean / base:.2f} | "
          f"{train[-1]['loss']:.4f} |")

names = {"none": "none (no balancing)", "micro": "MICRO_BATCH loss 1e-2",
         "global": "GLOBAL_BATCH loss 1e-2", "bias": "expert bias, rate 1e-2"}
corpora = {"text": "the demo text (fortunes 0.8 : licences 0.2)",
           "chains": "two synthetic Markov chains (0.8 : 0.2)"}
for corpus, title in corpora.items():
    rows, tables = [], {}
    for v in names:
        rs = records(f"{corpus}-{v}")
        train = [r for r in rs if r["type"] == "train"]
        evals = [r for r in rs if r["type"] == "eval"]
        last = [r for r in train if r["step"] > train[-1]["step"] - 50]
        load = sum(r["moe_max_load"] for r in last) / len(last)
        layer_load = [sum(r["moe_layer_max_load"][l] for r in last) / len(last)
                      for l in range(len(last[0]["moe_layer_max_load"]))]
        spec = [r for r in train if "moe_specialisation" in r][-1]["moe_specialisation"]
        tables[v] = spec
        rows.append((v, evals[-1]["loss"] if evals else float("nan"), train[-1]["loss"], load,
                     layer_load, spec["mi_bits"]))

    print(f"\n### {title}: balance options, {len(train)} steps on {np} ranks, the last 50 steps\n")
    print("| balance | eval loss | train loss | max/mean load | per layer | MI(source; expert) bits per layer |")
    print("| --- | --- | --- | --- | --- | --- |")
    for v, ev, tr, load, layer_load, mi in rows:
        print(f"| {names[v]} | {ev:.4f} | {tr:.4f} | {load:.2f} | "
              f"{' '.join(f'{x:.2f}' for x in layer_load)} | {' '.join(f'{x:.3f}' for x in mi)} |")

    sources = tables["none"]["sources"]
    experts = len(tables["none"]["share"][0][0])
    layer = 0
    print(f"\nShare of each source's tokens per expert, MoE layer {layer}, last 50 steps:\n")
    print("| balance | source | " + " | ".join(f"e{e}" for e in range(experts)) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in range(experts)) + " |")
    for v in names:
        for s, name in enumerate(sources):
            share = tables[v]["share"][layer][s]
            print(f"| {names[v] if s == 0 else ''} | {name} | " +
                  " | ".join(f"{x:.2f}" for x in share) + " |")
PY
