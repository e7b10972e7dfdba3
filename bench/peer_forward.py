"""The peer of bench/forward.cpp: transformers' no-grad forward on the same checkpoint,
ids, batch, length and threads. Prints one JSON line.
usage: peer_forward.py MODEL_DIR BATCH LENGTH ITERATIONS THREADS [logits|loss] [DEVICE]
loss: the model's own language-model loss of the ids (labels = ids), as evaluation runs it.
DEVICE: cpu (default), cuda …; on a GPU the clock stops after the device has finished."""
import json
import sys
import time

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, T5ForConditionalGeneration

path, B, T, iters, threads = sys.argv[1], *map(int, sys.argv[2:6])
loss = len(sys.argv) > 6 and sys.argv[6] == "loss"
device = torch.device(sys.argv[7] if len(sys.argv) > 7 else "cpu")
finish = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
torch.set_num_threads(threads)
kind = AutoConfig.from_pretrained(path).model_type
if kind in ("bert", "roberta"):
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    run = lambda ids, mask: model(input_ids=ids, attention_mask=mask)
elif kind == "t5":
    model = T5ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    # labels = the decoder's own inputs, the same target the Tessera side scores
    run = lambda ids, mask: (model(input_ids=ids, attention_mask=mask, labels=ids[:, : T // 4].contiguous(), use_cache=False).loss.item() if loss
                             else model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, : T // 4], use_cache=False))
else:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    run = lambda ids, mask: (model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss.item() if loss
                             else model(input_ids=ids, attention_mask=mask, use_cache=False))
model.to(device).eval()
torch.manual_seed(0)
ids = torch.randint(3, model.config.vocab_size, (B, T)).to(device)
mask = torch.ones(B, T, dtype=torch.long, device=device)
with torch.inference_mode():
    for _ in range(2):
        run(ids, mask)
    finish()
    start = time.perf_counter()
    for _ in range(iters):
        out = run(ids, mask)
    finish()
    s = time.perf_counter() - start
print(json.dumps({"tokens_per_s": B * T * iters / s, "seconds": s, **({"loss": out} if loss else {})}))
