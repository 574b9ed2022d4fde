#!/usr/bin/env python3
"""Independent check of a GGUF file written by `shears export --format gguf`, with llama.cpp's
own Python reader (PyPI `gguf`, from the llama.cpp repository): `pip install gguf numpy`.

    python3 scripts/check_gguf.py MODEL.gguf [--f32 SAME_MODEL_F32.gguf]

Checks the metadata a llama.cpp `llama` model needs, the tensor table against it (names,
shapes, types, alignment), the tokenizer arrays, and with --f32 that every tensor's bytes are
what gguf-py's reference quantisation (`gguf.quants.quantize`) gives for the f32 export's
tensor. Prints a summary; exits 1 on the first failed check. Optional: not run in CI.
"""
import argparse
import sys

import numpy as np

try:
    import gguf
    from gguf import GGMLQuantizationType as T
except ImportError:
    sys.exit("needs the gguf package: pip install gguf numpy")


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def field(r, key):
    f = r.get_field(key)
    if f is None:
        return None
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.contents(i) for i in range(len(f.data))]
    return f.contents()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--f32", help="the same model exported with --quant f32")
    a = ap.parse_args()
    r = gguf.GGUFReader(a.file)
    arch = field(r, "general.architecture")
    if arch != "llama":
        fail(f"general.architecture is {arch!r}")
    need = ["context_length", "embedding_length", "block_count", "feed_forward_length",
            "attention.head_count", "attention.head_count_kv", "rope.dimension_count",
            "rope.freq_base", "attention.layer_norm_rms_epsilon", "vocab_size"]
    hp = {}
    for k in need:
        v = field(r, f"llama.{k}")
        if v is None:
            fail(f"llama.{k} missing")
        hp[k] = v
    align = field(r, "general.alignment") or 32
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    model = field(r, "tokenizer.ggml.model")
    if tokens is None or types is None or model not in ("gpt2", "llama"):
        fail("tokenizer.ggml.tokens / token_type / model missing or unknown")
    if len(tokens) != len(types) or len(tokens) != hp["vocab_size"]:
        fail(f"{len(tokens)} tokens, {len(types)} types, vocab_size {hp['vocab_size']}")
    if model == "gpt2" and not field(r, "tokenizer.ggml.merges"):
        fail("gpt2 tokenizer without merges")
    if model == "llama" and field(r, "tokenizer.ggml.scores") is None:
        fail("llama tokenizer without scores")
    d, ff, nl = hp["embedding_length"], hp["feed_forward_length"], hp["block_count"]
    hd = hp["rope.dimension_count"]
    nh, nkv = hp["attention.head_count"], hp["attention.head_count_kv"]
    want = {"token_embd.weight": (d, len(tokens)), "output_norm.weight": (d,)}
    for i in range(nl):
        want.update({
            f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.ffn_norm.weight": (d,),
            f"blk.{i}.attn_q.weight": (d, nh * hd), f"blk.{i}.attn_k.weight": (d, nkv * hd),
            f"blk.{i}.attn_v.weight": (d, nkv * hd), f"blk.{i}.attn_output.weight": (nh * hd, d),
            f"blk.{i}.ffn_gate.weight": (d, ff), f"blk.{i}.ffn_up.weight": (d, ff),
            f"blk.{i}.ffn_down.weight": (ff, d),
        })
    have = {t.name: t for t in r.tensors}
    for name, shape in want.items():
        if name not in have:
            fail(f"tensor {name} missing")
        got = tuple(int(x) for x in have[name].shape)
        if got != shape:
            fail(f"{name}: shape (ggml order) {got}, expected {shape}")
    extra = set(have) - set(want) - {"output.weight", "rope_freqs.weight"}
    if extra:
        fail(f"unexpected tensors {sorted(extra)}")
    for t in r.tensors:
        if t.data_offset % align:
            fail(f"{t.name} at offset {t.data_offset}, not aligned to {align}")
    counts = {}
    for t in r.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    print(f"{a.file}: llama, {nl} blocks, d {d}, ff {ff}, heads {nh}/{nkv} x {hd}, "
          f"vocab {len(tokens)} ({model}, pre {field(r, 'tokenizer.ggml.pre')!r}), "
          f"tensors {counts}, chat template {'yes' if field(r, 'tokenizer.chat_template') else 'no'}")
    if a.f32:
        ref = {t.name: t for t in gguf.GGUFReader(a.f32).tensors}
        checked = 0
        for t in r.tensors:
            x = np.asarray(ref[t.name].data, dtype=np.float32).reshape(ref[t.name].data.shape)
            if t.tensor_type == T.F32:
                ok = np.array_equal(np.asarray(t.data).view(np.uint8), x.view(np.uint8))
            else:
                q = gguf.quants.quantize(x, t.tensor_type)
                ok = np.array_equal(np.asarray(t.data).view(np.uint8).ravel(), q.view(np.uint8).ravel())
            if not ok:
                fail(f"{t.name}: bytes differ from gguf-py's {t.tensor_type.name} of the f32 export")
            checked += 1
        print(f"{checked} tensors byte-identical to gguf-py's reference quantisation of {a.f32}")
    print("OK")


if __name__ == "__main__":
    main()
