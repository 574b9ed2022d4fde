"""Check that a directory written by `shears import` / `shears export` is a plain HF model:
transformers loads it as LlamaForCausalLM with no custom code, and its tokenizer and logits
match the shared SmolLM2 fixtures.

    shears export smollm2 --out /tmp/smol-hf
    python3 scripts/check_hf_load.py /tmp/smol-hf ../shared/fixtures/smollm2

Needs torch and transformers (not part of the test suite: they are several GB).
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, fixtures = Path(sys.argv[1]), Path(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
tok = AutoTokenizer.from_pretrained(model_dir)
print("class:", type(model).__name__, "| tokenizer:", type(tok).__name__)
assert type(model).__name__ == "LlamaForCausalLM"
manifest = json.loads((fixtures / "manifest.json").read_text())
worst = 0.0
for name, entry in manifest["texts"].items():
    ids = tok(entry["text"])["input_ids"]
    assert ids == entry["input_ids"], f"{name}: token ids differ"
    ref = load_file(str(fixtures / f"{name}.safetensors"))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    d = (logits[-1] - ref["logits_last"]).abs().max().item()
    worst = max(worst, d)
    print(f"{name}: max |logit - fixture| = {d:.2e}")
chat = manifest["chat_greedy"]
prompt = tok.apply_chat_template(chat["messages"], add_generation_prompt=True, tokenize=False)
assert prompt == chat["prompt_text"], "chat template renders differently"
out = model.generate(torch.tensor([tok(prompt)["input_ids"]]), max_new_tokens=20, do_sample=False)
text = tok.decode(out[0][len(chat["prompt_ids"]):], skip_special_tokens=True)
print("greedy chat:", repr(text))
assert worst <= 1e-3 and text == "The capital of France is Paris."
print("OK")
