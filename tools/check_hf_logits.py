#!/usr/bin/env python3
"""Checks a Loom <-> Hugging Face conversion with transformers itself.

    convert_hf --to-hf --from CKPT --to HF_DIR --logits loom_logits.safetensors
    python3 tools/check_hf_logits.py HF_DIR loom_logits.safetensors [--tol 1e-4]

loads HF_DIR with transformers' AutoModelForCausalLM (fp32, eager attention), runs the tokens stored in
the logits file, and compares its logits with Loom's: ||hf - loom|| / ||loom|| must be under --tol.
Exit status 0 when they agree, 1 when not, 2 on a usage or import problem. Needs torch, transformers
and safetensors (not Debian packages; any machine that has them will do).
"""
import argparse
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hf_dir")
    ap.add_argument("logits")
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    try:
        import torch
        import transformers
        from safetensors.torch import load_file
    except ImportError as e:
        print(f"check_hf_logits: {e}: this check needs torch, transformers and safetensors", file=sys.stderr)
        return 2
    ref = load_file(a.logits)
    tokens, loom = ref["tokens"], ref["logits"].double()
    model = transformers.AutoModelForCausalLM.from_pretrained(a.hf_dir, torch_dtype=torch.float32,
                                                              attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        hf = model(input_ids=tokens).logits.double()
    if hf.shape != loom.shape:
        print(f"check_hf_logits: transformers' logits have shape {tuple(hf.shape)}, Loom's {tuple(loom.shape)}")
        return 1
    rel = ((hf - loom).norm() / loom.norm()).item()
    same_argmax = (hf.argmax(-1) == loom.argmax(-1)).double().mean().item()
    ok = rel < a.tol
    print(f"{a.hf_dir}: {type(model).__name__} (transformers {transformers.__version__}) vs Loom: "
          f"rel err {rel:.2e} (tol {a.tol:.0e}), argmax agreement {same_argmax:.3f}: {'ok' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
