#!/usr/bin/env python3
"""The PyTorch eager peer of benchmarks/train_throughput: the same model (LLaMA-style dense or MoE),
written the way a PyTorch user would, trained with torch.optim.AdamW on the same batch.

It loads Loom's initial parameters and the batch from a safetensors file written by the C++ side
(parsed here with json + struct: no safetensors package needed), reports the first forward's loss
so the two implementations are checked against each other before they are timed, then times
`steps` training steps (forward, backward, clip, AdamW) after `warmup` steps and prints one JSON line.

Debian's python3-torch (1.13, the same LibTorch as libtorch-dev): `scripts/install-deps.sh --bench`.
"""
import argparse, ctypes, json, math, struct, sys, time

import torch
import torch.nn.functional as F

DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "BF16": torch.bfloat16}


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        t = torch.frombuffer(bytearray(data[base + b:base + end]), dtype=DTYPES[e["dtype"]])
        out[name] = t.reshape(e["shape"]).clone()
    return out, meta


def tune_malloc():
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    libc.mallopt(M_TOP_PAD, 64 << 20)


class RMSNorm(torch.nn.Module):
    def __init__(self, w, eps):
        super().__init__()
        self.weight = torch.nn.Parameter(w)
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, cos, sin):  # x [b, h, s, d]; rotate-half pairing
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Block(torch.nn.Module):
    def __init__(self, p, prefix, cfg):
        super().__init__()
        P = lambda n: torch.nn.Parameter(p[f"{prefix}.{n}"])
        self.cfg = cfg
        self.attn_norm = RMSNorm(p[f"{prefix}.attn_norm.weight"], cfg["eps"])
        self.ffn_norm = RMSNorm(p[f"{prefix}.ffn_norm.weight"], cfg["eps"])
        self.qkv = P("attn.qkv.weight")
        self.out = P("attn.out.weight")
        self.moe = f"{prefix}.moe.router.weight" in p
        if self.moe:
            self.router = P("moe.router.weight")
            self.w1 = P("moe.experts.fc1.weight")
            self.w2 = P("moe.experts.fc2.weight")
        else:
            self.fc1 = P("mlp.fc1.weight")
            self.fc2 = P("mlp.fc2.weight")

    def attention(self, x, cos, sin):
        b, s, _ = x.shape
        nh, nkv, d = self.cfg["heads"], self.cfg["kv_heads"], self.cfg["head_dim"]
        g = nh // nkv
        qkv = F.linear(x, self.qkv).view(b, s, nkv, g + 2, d)
        q = qkv[:, :, :, :g].reshape(b, s, nh, d).transpose(1, 2)
        k = qkv[:, :, :, g].transpose(1, 2)
        v = qkv[:, :, :, g + 1].transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if g > 1:
            k = k.repeat_interleave(g, 1)
            v = v.repeat_interleave(g, 1)
        if x.is_cuda:  # what a PyTorch user writes on a GPU
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return F.linear(o.transpose(1, 2).reshape(b, s, nh * d), self.out)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
        o = (probs @ v).transpose(1, 2).reshape(b, s, nh * d)
        return F.linear(o, self.out)

    def ffn(self, x):
        if not self.moe:
            gate, up = F.linear(x, self.fc1).chunk(2, -1)
            return F.linear(F.silu(gate) * up, self.fc2), x.new_zeros(())
        b, s, h = x.shape
        t = x.reshape(b * s, h)
        E, k = self.cfg["experts"], self.cfg["top_k"]
        logits = F.linear(t, self.router)
        vals, idx = torch.topk(logits, k, -1)
        gates = torch.softmax(vals, -1)
        flat = idx.reshape(-1)
        order = torch.sort(flat, stable=True)[1]
        counts = torch.bincount(flat, minlength=E)
        token = torch.div(order, k, rounding_mode="floor")
        xs = t[token]
        outs = []
        for e, (lo, n) in enumerate(zip(torch.cumsum(counts, 0) - counts, counts.tolist())):
            if n == 0:
                continue
            gate_, up_ = F.linear(xs[lo:lo + n], self.w1[e]).chunk(2, -1)
            outs.append(F.linear(F.silu(gate_) * up_, self.w2[e]))
        ys = torch.cat(outs) * gates.reshape(-1)[order].unsqueeze(1)
        y = torch.zeros_like(t).index_add(0, token, ys)
        probs = torch.softmax(logits, -1)
        aux = self.cfg["aux_coeff"] * E / (k * t.shape[0] ** 2) * (probs.sum(0) * counts.to(probs.dtype)).sum()
        return y.view(b, s, h), aux

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attn_norm(x), cos, sin)
        y, aux = self.ffn(self.ffn_norm(x))
        return x + y, aux


class Model(torch.nn.Module):
    def __init__(self, p, cfg):
        super().__init__()
        self.cfg = cfg
        self.embedding = torch.nn.Parameter(p["embedding.weight"])
        self.blocks = torch.nn.ModuleList(Block(p, f"layers.{i}", cfg) for i in range(cfg["layers"]))
        self.final_norm = RMSNorm(p["final_norm.weight"], cfg["eps"])
        self.head = torch.nn.Parameter(p["output.weight"])

    def forward(self, tokens, targets):
        b, s = tokens.shape
        d = self.cfg["head_dim"]
        dev = tokens.device
        inv = self.cfg["theta"] ** (-2.0 * torch.arange(d // 2, dtype=torch.float32, device=dev) / d)
        ang = torch.arange(s, dtype=torch.float32, device=dev)[:, None] * inv
        cos, sin = ang.cos(), ang.sin()
        x = F.embedding(tokens, self.embedding)
        aux = x.new_zeros(())
        for blk in self.blocks:
            x, a = blk(x, cos, sin)
            aux = aux + a
        logits = F.linear(self.final_norm(x), self.head)
        loss = F.cross_entropy(logits.view(b * s, -1).float(), targets.reshape(-1))
        return loss, aux


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tune-malloc", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    a = ap.parse_args()
    if a.tune_malloc:
        tune_malloc()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    p, meta = load_safetensors(a.weights)
    cfg = json.loads(meta["config"])
    dev = torch.device(a.device)
    p = {k: v.to(dev) for k, v in p.items()}
    tokens, targets = p.pop("batch.tokens"), p.pop("batch.targets")
    model = Model(p, cfg)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    decay = [q for n, q in model.named_parameters() if q.dim() > 1]
    no_decay = [q for n, q in model.named_parameters() if q.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    with torch.no_grad(), amp:
        first_loss, first_aux = model(tokens, targets)
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with amp:
            loss, aux = model(tokens, targets)
        (loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    print(json.dumps({"loss": first_loss.item(), "aux": float(first_aux), "median_step_s": times[len(times) // 2],
                      "threads": torch.get_num_threads(), "torch": torch.__version__}))


if __name__ == "__main__":
    sys.exit(main())
