"""PyTorch CPU reference for `shears bench forward [--train]`: the same figures, same shapes.

    python3 scripts/bench_torch.py [--threads 2] [--seq-len 256] [--iters 3] [--train] [--skip-model]

Figures: SmolLM2-135M forward at 1 x L and 8 x L (tok/s); with --train also its training step
(forward, cross-entropy, backward, AdamW) at 1 x L and 4 x L, and a pruning step at 4 x L with
hard-concrete masks on heads, MLP channels, hidden channels and layers plus a Lagrangian term
(the step Shears' pruning stage takes), reported as its ratio to the plain step; and the tiny
LLaMA training step at 8 x L. Each figure is the median of --iters timed runs after a warm-up.

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

    def forward(self, x, cos, sin, masks=None):
        b, t, _ = x.shape
        zh, zl, zq, zi = masks if masks is not None else (None, None, None, None)
        a = self.norm(x, self.n1)
        if zh is not None:
            a = a * zh
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
        if zq is not None:
            ctx = ctx * zq.view(1, self.h, 1, 1)
        o = self.o(ctx.transpose(1, 2).reshape(b, t, self.h * self.hd))
        if zl is not None:
            o = o * zl * zh
        x = x + o
        m = self.norm(x, self.n2)
        if zh is not None:
            m = m * zh
        up = self.up(m)
        if zi is not None:
            up = up * zi
        y = self.down(F.silu(self.gate(m)) * up)
        if zl is not None:
            y = y * zl * zh
        return x + y


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

    def forward(self, ids, masks=None):
        t = ids.shape[1]
        inv = 1.0 / (self.theta ** (torch.arange(0, self.hd, 2).float() / self.hd))
        f = torch.outer(torch.arange(t).float(), inv)
        emb = torch.cat((f, f), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.emb(ids)
        if masks is not None:
            x = x * masks["hidden"]
        for i, blk in enumerate(self.blocks):
            m = None
            if masks is not None:
                m = (masks["hidden"], masks["layer"][i], masks["heads"][i], masks["inter"][i])
            x = blk(x, cos, sin, m)
        x = self.nf * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        return x @ self.emb.weight.t() if self.head is None else self.head(x)


def timed(iters, fn):
    """Median seconds of `iters` runs after one warm-up."""
    fn()
    runs = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return sorted(runs)[len(runs) // 2]


def hard_concrete(log_alpha, beta=2.0 / 3.0, l=-0.1, r=1.1):
    u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u / (1 - u)) + log_alpha) / beta)
    return (s * (r - l) + l).clamp(0.0, 1.0)


def train_step(model, opt, ids, vocab, mask_params=None, lambdas=None):
    masks = None
    extra = 0.0
    if mask_params is not None:
        masks = {k: hard_concrete(v) for k, v in mask_params.items()}
        # Expected-size Lagrangian: one multiplier pair per module, as the spec's.
        for k, v in mask_params.items():
            expected = torch.sigmoid(v - (2.0 / 3.0) * torch.log(torch.tensor(0.1 / 1.1))).mean()
            diff = expected - 0.5
            extra = extra + lambdas[k][0] * diff + lambdas[k][1] * diff * diff
    logits = model(ids, masks)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1)) + extra
    opt.zero_grad()
    loss.backward()
    opt.step()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--train", action="store_true", help="also time SmolLM2 training and pruning steps")
    ap.add_argument("--skip-model", action="store_true", help="only the tiny LLaMA training step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    L = args.seq_len
    out = {"torch": torch.__version__, "threads": args.threads, "seq_len": L, "iters": args.iters}

    smol = Llama(49152, 576, 30, 9, 3, 1536, tied=True, theta=100000.0).eval()
    for b in () if args.skip_model else (1, 8):
        ids = torch.randint(0, 49152, (b, L))
        with torch.inference_mode():
            secs = timed(args.iters, lambda: smol(ids))
        out[f"forward_{b}_tok_s"] = b * L / secs

    if args.train and not args.skip_model:
        smol.train()
        opt = torch.optim.AdamW(smol.parameters(), lr=1e-5)
        for b in (1, 4):
            ids = torch.randint(0, 49152, (b, L))
            secs = timed(args.iters, lambda: train_step(smol, opt, ids, 49152))
            out[f"train_{b}_tok_s"] = b * L / secs
            if b == 4:
                out["train_4_step_s"] = secs
        ids = torch.randint(0, 49152, (4, L))
        mask_params = {
            "hidden": nn.Parameter(torch.full((576,), 2.0)),
            "layer": nn.Parameter(torch.full((30,), 2.0)),
            "heads": nn.Parameter(torch.full((30, 9), 2.0)),
            "inter": nn.Parameter(torch.full((30, 1536), 2.0)),
        }
        lambdas = {k: (nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))) for k in mask_params}
        params = [{"params": list(smol.parameters())}, {"params": list(mask_params.values()), "lr": 1.0},
                  {"params": [p for pair in lambdas.values() for p in pair], "lr": 1.0}]
        opt = torch.optim.AdamW(params, lr=1e-5)
        masked = timed(args.iters, lambda: train_step(smol, opt, ids, 49152, mask_params, lambdas))
        out["prune_4_step_s"] = masked
        out["prune_over_plain"] = masked / out["train_4_step_s"]

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
    out["tiny_train_8_tok_s"] = 8 * L / secs
    print(json.dumps(out))


if __name__ == "__main__":
    main()
