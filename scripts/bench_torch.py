"""PyTorch CPU reference for `shears bench forward`: the same two figures, same shapes.

    python3 scripts/bench_torch.py [--threads 2] [--seq-len 256] [--iters 3]

Needs torch (any 2.x). The model is a plain LLaMA written here (RMSNorm, RoPE, GQA through
scaled_dot_product_attention, SwiGLU), with SmolLM2-135M's shapes and random weights for the
forward figures (speed does not depend on the values), and the tiny LLaMA of the Shears benchmark
for the training step (AdamW).
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, h, kv, hd, ff, eps):
        super().__init__()
        self.h, self.kv, self.hd, self.eps = h, kv, hd, eps
        self.q = nn.Linear(d, h * hd, bias=False)
        self.k = nn.Linear(d, kv * hd, bias=False)
        self.v = nn.Linear(d, kv * hd, bias=False)
        self.o = nn.Linear(h * hd, d, bias=False)
        self.gate = nn.Linear(d, ff, bias=False)
        self.up = nn.Linear(d, ff, bias=False)
        self.down = nn.Linear(ff, d, bias=False)
        self.n1 = nn.Parameter(torch.ones(d))
        self.n2 = nn.Parameter(torch.ones(d))

    def norm(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        a = self.norm(x, self.n1)
        q = self.q(a).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k(a).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v(a).view(b, t, self.kv, self.hd).transpose(1, 2)

        def rope(z):
            z1, z2 = z.chunk(2, dim=-1)
            return z * cos + torch.cat((-z2, z1), dim=-1) * sin

        q, k = rope(q), rope(k)
        r = self.h // self.kv
        k = k.repeat_interleave(r, dim=1)
        v = v.repeat_interleave(r, dim=1)
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(ctx.transpose(1, 2).reshape(b, t, self.h * self.hd))
        m = self.norm(x, self.n2)
        return x + self.down(F.silu(self.gate(m)) * self.up(m))


class Llama(nn.Module):
    def __init__(self, vocab, d, layers, h, kv, ff, tied, theta=10000.0, eps=1e-5):
        super().__init__()
        self.hd = d // h
        self.theta = theta
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, h, kv, self.hd, ff, eps) for _ in range(layers))
        self.nf = nn.Parameter(torch.ones(d))
        self.eps = eps
        self.head = None if tied else nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        t = ids.shape[1]
        inv = 1.0 / (self.theta ** (torch.arange(0, self.hd, 2).float() / self.hd))
        f = torch.outer(torch.arange(t).float(), inv)
        emb = torch.cat((f, f), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.emb(ids)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        x = self.nf * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        return x @ self.emb.weight.t() if self.head is None else self.head(x)


def timed(iters, fn):
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    L = args.seq_len
    out = {"torch": torch.__version__, "threads": args.threads, "seq_len": L, "iters": args.iters}

    smol = Llama(49152, 576, 30, 9, 3, 1536, tied=True, theta=100000.0).eval()
    for b in (1, 8):
        ids = torch.randint(0, 49152, (b, L))
        with torch.inference_mode():
            secs = timed(args.iters, lambda: smol(ids))
        out[f"forward_{b}_tok_s"] = b * L * args.iters / secs

    tiny = Llama(8192, 256, 4, 4, 4, 688, tied=False)
    opt = torch.optim.AdamW(tiny.parameters(), lr=1e-3)
    ids = torch.randint(0, 8192, (8, L))

    def step():
        logits = tiny(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 8192), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    secs = timed(args.iters, step)
    out["tiny_train_8_tok_s"] = 8 * L * args.iters / secs
    print(json.dumps(out))


if __name__ == "__main__":
    main()
