"""The peer of bench/generate.cpp: transformers' greedy `generate` (key/value cache) on the
same checkpoint, random prompt ids, batch, lengths and threads, with no EOS to stop a row.
Prints one JSON line with the first row's new tokens. With ADAPTER_DIR, a PEFT folder (a
prefix, a prompt) loaded by PeftModel.from_pretrained, whose generate runs.
usage: peer_generate.py MODEL_DIR BATCH PROMPT_LENGTH NEW_TOKENS ITERATIONS THREADS [ADAPTER_DIR]"""
import json
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, T5ForConditionalGeneration

path, B, T, new, iters, threads = sys.argv[1], *map(int, sys.argv[2:7])
torch.set_num_threads(threads)
t5 = AutoConfig.from_pretrained(path).model_type == "t5"
model = (T5ForConditionalGeneration if t5 else AutoModelForCausalLM).from_pretrained(path, dtype=torch.float32).eval()
if len(sys.argv) > 7:
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, sys.argv[7]).eval()
model.generation_config.eos_token_id = None  # every row runs to the end, as on the Tessera side
torch.manual_seed(0)
ids = torch.randint(3, model.config.vocab_size, (B, T))
mask = torch.ones(B, T, dtype=torch.long)
run = lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
with torch.inference_mode():
    out = run()
    start = time.perf_counter()
    for _ in range(iters):
        out = run()
    s = time.perf_counter() - start
first = out[0, (1 if t5 else T):].tolist()  # T5 starts with decoder_start_token_id
print(json.dumps({"new_tokens_per_s": B * (out.shape[1] - (1 if t5 else T)) * iters / s, "seconds": s, "first_row": first}))
