#!/usr/bin/env python3
"""Check Shears' GGUF exports against llama.cpp, the runtime users deploy on.

For SmolLM2-135M exported as f32 GGUF with each rope type the exporter writes (none, linear,
Llama-3 with the published factors and with others), and SmolLM2's weights relabelled as the
other families Shears exports (Qwen2 with q/k/v biases added, written as llama.cpp's `qwen2`;
Mistral with a window wider than the text, written as `llama`; Qwen3 with q/k norms added, as
`qwen3`; Gemma 3 with its extra norms added and a 16-token window, as `gemma3`), score one text with `shears
score` on the exported file and with llama.cpp (node-llama-cpp@3.21.1's prebuilt CPU binaries, through
scripts/llama_cpp_score.mjs): the token ids must be equal and the mean NLL agree within 2e-3
(llama.cpp keeps an f16 KV cache). The scaled ropes and the biases must also change the
scores (so a scaling or bias that one side ignores cannot pass).

    python3 scripts/check_llama_cpp.py [--shears PATH] [--work DIR] [--only NAME ...]
        [--family-exports DIR]

With `--family-exports DIR` (what `SHEARS_FAMILY_EXPORTS=DIR cargo test -p shears-cli --test
families` leaves: each family's tiny model pruned, trained with KD and exported as f32 GGUF), the
exports llama.cpp runs as Shears does (no window it ignores, its layer pattern and query scale)
are scored too: Qwen2, Qwen3, and Gemma 3 with a window of 4 over the text.

node-llama-cpp is installed with npm into $SHEARS_CACHE/node-llama-cpp (default
~/.cache/shears) on first use. Exit status 1 when a check fails.
"""

import argparse
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = "3.21.1"
TOLERANCE = 2e-3
TEXT = (
    "The quick brown fox jumps over the lazy dog. Shears prunes large language models into "
    "smaller ones, and llama.cpp runs them on laptops. In 1905, Albert Einstein published four "
    "papers that changed physics: on the photoelectric effect, Brownian motion, special "
    "relativity and the equivalence of mass and energy.\n"
)
ROPES = [
    ("default", None),
    ("linear x2", {"rope_type": "linear", "factor": 2.0}),
    (
        "llama3 (published factors)",
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    (
        "llama3 (other factors)",
        {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 2.0,
         "high_freq_factor": 8.0, "original_max_position_embeddings": 64},
    ),
]

# The pruned family exports (cli/tests/families.rs) whose GGUF llama.cpp runs as Shears does.
FAMILY_EXPORTS = ["qwen2", "qwen3", "gemma3-untied"]

FAMILIES = [
    ("qwen2 (q/k/v biases)", {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                              "use_sliding_window": False}),
    ("mistral (window > text)", {"architectures": ["MistralForCausalLM"],
                                 "model_type": "mistral", "sliding_window": 4096}),
    ("qwen3 (q/k norms)", {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                           "head_dim": 64, "use_sliding_window": False}),
    # llama.cpp's gemma3: every sixth layer global, local rope base 1e4, scale head_dim^-1/2;
    # a window of 16 tokens, far shorter than the text.
    ("gemma3 (window 16)", {"architectures": ["Gemma3ForCausalLM"],
                            "model_type": "gemma3_text", "head_dim": 64,
                            "hidden_act": "gelu_pytorch_tanh",
                            "hidden_activation": "gelu_pytorch_tanh",
                            "query_pre_attn_scalar": 64, "sliding_window": 16,
                            "rope_local_base_freq": 10000.0, "final_logit_softcapping": None,
                            "attn_logit_softcapping": None}),
]


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-4000:]}")
    return r.stdout


def install(cache):
    """node-llama-cpp and its linux-x64 CPU binaries (not the CUDA / Vulkan ones)."""
    dest = os.path.join(cache, "node-llama-cpp")
    marker = os.path.join(dest, "node_modules", "node-llama-cpp", "package.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f).get("version") == VERSION:
                return dest
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, "package.json"), "w") as f:
        json.dump({"name": "shears-llama-cpp-check", "private": True}, f)
    run(["npm", "i", "-E", "--no-audit", "--no-fund", "--omit=optional",
         f"node-llama-cpp@{VERSION}", f"@node-llama-cpp/linux-x64@{VERSION}"], cwd=dest)
    return dest


def add_tensors(src, dst, extra):
    """Copy safetensors file `src` to `dst` with the f32 tensors of `extra` (name -> (shape,
    values)) added, in plain Python (no numpy)."""
    with open(src, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        start = 8 + n
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        blobs = []
        for name, (shape, values) in extra.items():
            blob = struct.pack(f"<{len(values)}f", *values)
            header[name] = {"dtype": "F32", "shape": shape,
                            "data_offsets": [end, end + len(blob)]}
            end += len(blob)
            blobs.append(blob)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(dst, "wb") as out:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            f.seek(start)
            shutil.copyfileobj(f, out, 1 << 24)
            for blob in blobs:
                out.write(blob)


def family_model(hf, base, model, overrides):
    """SmolLM2 relabelled as another family: Qwen2 gets q/k/v biases large enough to move the
    scores, Qwen3 per-head q/k norms, Gemma 3 those and its feedforward norms (its gains are
    `1 + w`, so every norm of SmolLM2 becomes another gain: any weights make a Gemma model)."""
    cfg = dict(base, **overrides)
    shutil.copytree(hf, model, ignore=shutil.ignore_patterns("model.safetensors"))
    extra = {}
    rng = random.Random(39)
    if cfg["model_type"] in ("qwen3", "gemma3_text"):
        gain = 1.0 if cfg["model_type"] == "qwen3" else 0.0
        names = ["self_attn.q_norm", "self_attn.k_norm"]
        if cfg["model_type"] == "gemma3_text":
            names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for layer in range(cfg["num_hidden_layers"]):
            for n in names:
                width = cfg["head_dim"] if n.startswith("self_attn") else cfg["hidden_size"]
                extra[f"model.layers.{layer}.{n}.weight"] = (
                    [width], [gain + rng.uniform(-0.5, 0.5) for _ in range(width)])
    if cfg["model_type"] == "qwen2":
        hd = cfg["hidden_size"] // cfg["num_attention_heads"]
        rows = {"q": cfg["num_attention_heads"] * hd, "k": cfg["num_key_value_heads"] * hd,
                "v": cfg["num_key_value_heads"] * hd}
        for layer in range(cfg["num_hidden_layers"]):
            for p, r in rows.items():
                extra[f"model.layers.{layer}.self_attn.{p}_proj.bias"] = (
                    [r], [rng.uniform(-0.5, 0.5) for _ in range(r)])
    add_tensors(os.path.join(hf, "model.safetensors"), os.path.join(model, "model.safetensors"),
                extra)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(cfg, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shears", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(HERE, "..", "target")), "debug", "shears"))
    ap.add_argument("--work", help="folder for the exports (default: a temporary one)")
    ap.add_argument("--family-exports", help="folder of pruned family GGUFs (see above)")
    ap.add_argument("--only", nargs="*", default=[],
                    help="run only the cases whose name starts with one of these")
    a = ap.parse_args()
    cache = os.environ.get("SHEARS_CACHE", os.path.expanduser("~/.cache/shears"))
    node_dir = install(cache)
    work = a.work or tempfile.mkdtemp(prefix="shears-llama-cpp-")
    os.makedirs(work, exist_ok=True)
    text = os.path.join(work, "text.txt")
    with open(text, "w") as f:
        f.write(TEXT)
    hf = os.path.join(work, "smollm2")
    run([a.shears, "import", "smollm2", "--out", hf, "--force"])
    with open(os.path.join(hf, "config.json")) as f:
        base = json.load(f)
    for k in ("rope_scaling", "rope_parameters"):
        base.pop(k, None)
    failures, means = [], {}
    print(f"{'model':<28} {'tokens':>6} {'shears':>10} {'llama.cpp':>10} {'|diff|':>9}")
    for name, rope, family in [(n, r, None) for n, r in ROPES] + [
            (n, None, f) for n, f in FAMILIES]:
        if a.only and not any(name.startswith(o) for o in a.only):
            continue
        model = os.path.join(work, f"model-{len(means)}")
        if os.path.exists(model):
            shutil.rmtree(model)
        if family:
            family_model(hf, base, model, family)
        else:
            shutil.copytree(hf, model)
            cfg = dict(base)
            if rope:
                cfg["rope_scaling"] = rope
            with open(os.path.join(model, "config.json"), "w") as f:
                json.dump(cfg, f)
        gguf = model + ".gguf"
        run([a.shears, "export", model, "--out", gguf, "--quant", "f32", "--force"])
        ours = json.loads(run([a.shears, "score", "--model", gguf, "--text-file", text, "--json"]))
        env = dict(os.environ, NODE_LLAMA_CPP_DIR=node_dir)
        theirs = json.loads(run(["node", os.path.join(HERE, "llama_cpp_score.mjs"), gguf, text],
                                env=env))
        diff = abs(ours["mean_nll"] - theirs["mean_nll"])
        means[name] = ours["mean_nll"]
        print(f"{name:<28} {len(ours['token_ids']):>6} {ours['mean_nll']:>10.5f} "
              f"{theirs['mean_nll']:>10.5f} {diff:>9.2e}")
        if ours["token_ids"] != theirs["token_ids"]:
            failures.append(f"{name}: token ids differ")
        if not diff <= TOLERANCE:
            failures.append(f"{name}: mean NLL differs by {diff:.2e} (> {TOLERANCE})")
        if not a.work:
            shutil.rmtree(model, ignore_errors=True)
            os.remove(gguf)
    for fam in (FAMILY_EXPORTS if a.family_exports else []):
        gguf = os.path.join(a.family_exports, fam + ".gguf")
        ours = json.loads(run([a.shears, "score", "--model", gguf, "--text-file", text, "--json"]))
        theirs = json.loads(run(["node", os.path.join(HERE, "llama_cpp_score.mjs"), gguf, text],
                                env=dict(os.environ, NODE_LLAMA_CPP_DIR=node_dir)))
        diff = abs(ours["mean_nll"] - theirs["mean_nll"])
        name = f"pruned {fam}"
        print(f"{name:<28} {len(ours['token_ids']):>6} {ours['mean_nll']:>10.5f} "
              f"{theirs['mean_nll']:>10.5f} {diff:>9.2e}")
        if ours["token_ids"] != theirs["token_ids"]:
            failures.append(f"{name}: token ids differ")
        if not diff <= TOLERANCE:
            failures.append(f"{name}: mean NLL differs by {diff:.2e} (> {TOLERANCE})")
    for name, _ in ROPES[1:] + FAMILIES[:1] + FAMILIES[2:3]:
        if name not in means or "default" not in means:
            continue
        if abs(means[name] - means["default"]) < 1e-3:
            failures.append(f"{name}: scores equal the plain model's (scaling or bias ignored?)")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        sys.exit("llama.cpp check failed:\n  " + "\n  ".join(failures))
    print("llama.cpp agrees with Shears on every export")


if __name__ == "__main__":
    main()
