#!/usr/bin/env python3
"""Interoperability checks and fixtures made with the real third-party libraries.

Debian has no transformers, tensorboard or Python sentencepiece trainer of the versions people use,
so this script runs once on a machine that has them (the lent GPU machine's Python) and:

1. loads Loom's Hugging Face exports (IN/llama_hf, IN/mixtral_hf) with transformers and compares
   the logits with Loom's (IN/*_loom_logits.safetensors, written by `convert_hf --logits`);
2. reads a Loom TensorBoard run (IN/tb) with TensorBoard's own EventAccumulator;
3. writes fixtures that CTest checks on every CI run without those libraries (OUT/fixtures):
   - hf_llama/, hf_mixtral/: tiny models saved by transformers' save_pretrained, with
     expected.safetensors holding tokens and transformers' fp32 logits;
   - tensorboard/events.reference: records written by tensorboard's RecordWriter with fixed wall
     times, and its content in events.reference.json;
   - sentencepiece/: a BPE and a unigram model trained by sentencepiece, with encodings of sample text.

    python3 tests/interop/device_interop.py IN OUT
"""
import json
import os
import subprocess
import sys

IN, OUT = sys.argv[1], sys.argv[2]
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FIX = os.path.join(OUT, "fixtures")
os.makedirs(FIX, exist_ok=True)
failures = []


def section(name):
    print(f"\n=== {name}", flush=True)


import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

print(f"torch {torch.__version__}, transformers {transformers.__version__}")

# ---- 1. Loom exports load in transformers with the same logits.
section("Loom -> transformers")
for m in ("llama", "mixtral"):
    rc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_hf_logits.py"),
                         os.path.join(IN, f"{m}_hf"), os.path.join(IN, f"{m}_loom_logits.safetensors"),
                         "--tol", "1e-5"]).returncode
    if rc != 0:
        failures.append(f"check_hf_logits {m}")

# ---- 3a. transformers-written checkpoints as fixtures.
section("transformers fixtures")
TOKENS = torch.tensor([[1, 7, 42, 99, 150, 151, 3, 299, 0, 64, 128, 255, 17, 18, 19, 200]])


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():  # norms start at 1: make every mapping visible
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


for name, cfg in [
    ("hf_llama", transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          rms_norm_eps=1e-6, rope_theta=500000.0, tie_word_embeddings=False)),
    ("hf_mixtral", transformers.MixtralConfig(vocab_size=300, hidden_size=64, intermediate_size=48,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                                              num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
                                              sliding_window=None)),
]:
    torch.manual_seed(3)
    cls = transformers.LlamaForCausalLM if name == "hf_llama" else transformers.MixtralForCausalLM
    cfg._attn_implementation = "eager"
    model = cls(cfg).float().eval()
    perturb(model, 11)
    d = os.path.join(FIX, name)
    model.save_pretrained(d, safe_serialization=True)
    with torch.no_grad():
        logits = model(input_ids=TOKENS).logits.float().contiguous()
    save_file({"tokens": TOKENS.contiguous(), "logits": logits}, os.path.join(d, "expected.safetensors"))
    print(name, sorted(os.listdir(d)))
    print(open(os.path.join(d, "config.json")).read())
    names = sorted(load_file(os.path.join(d, "model.safetensors")).keys())
    print(f"{len(names)} tensors:", names[:12], "...")
    # Reload: what transformers wrote, it reads back to the same logits.
    again = cls.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        err = (again(input_ids=TOKENS).logits - logits).abs().max().item()
    print(f"{name}: reload max abs diff {err:.1e}")

# ---- 2. TensorBoard reads Loom's event file.
section("TensorBoard reads Loom's events")
try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(os.path.join(IN, "tb"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    print("scalar tags:", tags)
    for t in tags:
        print(f"  {t}: " + ", ".join(f"step {e.step} = {e.value:.6g}" for e in ea.Scalars(t)))
    need = {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/mfu"}
    if not need <= set(tags) or len(ea.Scalars("train/loss")) == 0:
        failures.append(f"tensorboard tags {sorted(need - set(tags))} missing")
except Exception as e:  # noqa: BLE001
    failures.append(f"tensorboard: {e!r}")
    print("tensorboard failed:", repr(e))

# ---- 3b. TensorBoard's own writer, fixed wall times: known bytes for the CTest.
section("TensorBoard reference records")
try:
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    os.makedirs(os.path.join(FIX, "tensorboard"), exist_ok=True)
    content = {"version_wall_time": 1700000000.5,
               "events": [{"step": 7, "wall_time": 1700000001.25, "values": [["train/loss", 2.5], ["train/lr", 0.001]]},
                          {"step": 8, "wall_time": 1700000002.0, "values": [["perf/mfu", 0.375]]}]}
    with open(os.path.join(FIX, "tensorboard", "events.reference"), "wb") as f:
        w = RecordWriter(f)
        w.write(event_pb2.Event(wall_time=content["version_wall_time"], file_version="brain.Event:2").SerializeToString())
        for e in content["events"]:
            s = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in e["values"]])
            w.write(event_pb2.Event(wall_time=e["wall_time"], step=e["step"], summary=s).SerializeToString())
        w.flush()
    json.dump(content, open(os.path.join(FIX, "tensorboard", "events.reference.json"), "w"), indent=1)
    print(open(os.path.join(FIX, "tensorboard", "events.reference"), "rb").read().hex())
except Exception as e:  # noqa: BLE001
    failures.append(f"tensorboard writer: {e!r}")
    print("tensorboard writer failed:", repr(e))

# ---- 3c. SentencePiece models and encodings.
section("sentencepiece fixtures")
try:
    import sentencepiece as spm
    d = os.path.join(FIX, "sentencepiece")
    os.makedirs(d, exist_ok=True)
    corpus = os.path.join(ROOT, "LICENSE")
    samples = ["Hello world, this is Loom.", "  leading spaces and\ttabs", "Übergrößenträger – ünïcödé ✓",
               "Permission is hereby granted, free of charge", ""]
    enc = {"samples": samples}
    for kind, size in (("bpe", 320), ("unigram", 384)):
        spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(d, kind), vocab_size=size,
                                       model_type=kind, byte_fallback=True, character_coverage=1.0,
                                       num_threads=4, minloglevel=2)
        sp = spm.SentencePieceProcessor(model_file=os.path.join(d, f"{kind}.model"))
        enc[kind] = {"vocab_size": sp.get_piece_size(), "eos_id": sp.eos_id(), "bos_id": sp.bos_id(),
                     "unk_id": sp.unk_id(), "ids": [sp.encode(s) for s in samples],
                     "decoded": [sp.decode(sp.encode(s)) for s in samples]}
        os.remove(os.path.join(d, f"{kind}.vocab"))
        print(kind, enc[kind]["vocab_size"], enc[kind]["ids"][0])
    enc["sentencepiece_version"] = spm.__version__
    json.dump(enc, open(os.path.join(d, "encodings.json"), "w"), indent=1, ensure_ascii=False)
except Exception as e:  # noqa: BLE001
    failures.append(f"sentencepiece: {e!r}")
    print("sentencepiece failed:", repr(e))

section("summary")
print("interop failures:", failures if failures else "none")
sys.exit(1 if failures else 0)
