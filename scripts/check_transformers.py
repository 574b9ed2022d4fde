#!/usr/bin/env python3
"""Check that transformers loads Shears' HF exports as their family's own `*ForCausalLM`
(no custom code) and scores them as Shears does.

For each model directory: `AutoModelForCausalLM.from_pretrained` (trust_remote_code off) must
build the class `config.json` names; the text's token ids (the export's own tokenizer.json) and
mean next-token NLL, in f32 with eager attention, must equal `shears score`'s within 1e-4.

    SHEARS_FAMILY_EXPORTS=/tmp/fam cargo test -p shears-cli --test families
    /tmp/pyenv/bin/python scripts/check_transformers.py /tmp/fam/*/

Needs torch and transformers (`pip install torch transformers safetensors`). Exit status 1
when a check fails.
"""

import argparse
import json
import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
TOLERANCE = 1e-4
TEXT = ("the cat sat on the mat and then they thought about it. fn main() { let mut x = 1; } "
        "Lorem ipsum dolor sit amet, the theorem follows. QED")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--shears", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(HERE, "..", "target")), "debug", "shears"))
    a = ap.parse_args()
    failures = []
    print(f"{'model':<32} {'class':<24} {'tokens':>6} {'shears':>10} {'transformers':>12} "
          f"{'|diff|':>9}")
    for m in a.models:
        with open(os.path.join(m, "config.json")) as f:
            arch = json.load(f)["architectures"][0]
        model = AutoModelForCausalLM.from_pretrained(
            m, dtype=torch.float32, attn_implementation="eager", trust_remote_code=False).eval()
        tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(m, "tokenizer.json"))
        ids = tok(TEXT, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        nll = [-logp[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
        theirs = sum(nll) / len(nll)
        r = subprocess.run([a.shears, "score", "--model", m, "--text", TEXT, "--json"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"shears score failed on {m}: {r.stderr[-2000:]}")
        ours = json.loads(r.stdout)
        diff = abs(ours["mean_nll"] - theirs)
        name = os.path.basename(os.path.normpath(m))
        cls = type(model).__name__
        print(f"{name:<32} {cls:<24} {len(ids):>6} {ours['mean_nll']:>10.5f} {theirs:>12.5f} "
              f"{diff:>9.2e}")
        if cls != arch:
            failures.append(f"{name}: transformers built {cls}, config.json names {arch}")
        if ours["token_ids"] != ids:
            failures.append(f"{name}: token ids differ")
        if not diff <= TOLERANCE:
            failures.append(f"{name}: mean NLL differs by {diff:.2e} (> {TOLERANCE})")
    if failures:
        sys.exit("transformers check failed:\n  " + "\n  ".join(failures))
    print("transformers agrees with Shears on every export")


if __name__ == "__main__":
    main()
