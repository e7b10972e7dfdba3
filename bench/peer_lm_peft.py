"""The peer of bench/lm_lora_vs_peft.sh: LoRA (or --method: one of its relatives, as
bench/peer_methods.py builds them) causal-LM fine-tuning with transformers + peft
on the same torch, checkpoint, tokenizer, batches (Tessera's seeded split, consecutive
batches), targets, rank, learning-rate schedule and threads — or, with --full, full
fine-tuning of every weight (bench/fish_memory.sh's reference). Prints one JSON line:
examples/s over the timed steps and the last step's loss."""
import argparse
import json
import time

import torch
from peft import get_peft_model
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

from peer_methods import REPARAMETERIZED, optimizer, peft_config
from peer_split import train_rows

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--warmup-steps", type=int, default=3)
ap.add_argument("--batch-size", type=int, default=16)
ap.add_argument("--max-length", type=int, default=64)
ap.add_argument("--test-fraction", type=float, default=0.02)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--targets", default="c_attn,c_proj,c_fc", help="peft target_modules, comma-separated")
ap.add_argument("--fan-in-fan-out", action="store_true", help="GPT-2's Conv1D weights")
ap.add_argument("--device", default="cpu")
ap.add_argument("--method", choices=REPARAMETERIZED, default="lora")
ap.add_argument("--full", action="store_true", help="full fine-tuning: every weight trains, no peft")
ap.add_argument("--quantize", choices=["none", "nf4"], default="none", help="nf4: QLoRA, the base in bitsandbytes 4-bit with double quantization")
ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (prepare_model_for_kbit_training's default)")
args = ap.parse_args()
device = torch.device(args.device)
finish = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # the clock waits for the device
torch.set_num_threads(args.threads)
torch.manual_seed(0)

train = [r["text"] for r in train_rows(args.data, args.test_fraction)]

tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
if args.quantize == "nf4":  # QLoRA as PEFT users run it: bitsandbytes NF4, double quantization, prepare_model_for_kbit_training
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, quantization_config=q, device_map=args.device)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
else:
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
eos = model.config.eos_token_id
eos = eos[0] if isinstance(eos, list) else eos
total = args.warmup_steps + args.steps
# CAUSAL_LM: peft's causal-LM wrapper calls its tuner's forward, where AdaLoRA adds its
# orthogonality term to the loss (a bare PeftModel skips that forward, and the term with it).
model = (model if args.full else get_peft_model(model, peft_config(args.method, args.targets.split(","), total, task_type="CAUSAL_LM",
                                                                     fan_in_fan_out=args.fan_in_fan_out))).to(device)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01) if args.full else optimizer(args.method, model)
params = [p for p in model.parameters() if p.requires_grad]  # LoRA-FA: lora_A frozen by its optimizer's set-up
# Tessera's schedule over the same steps: linear warm-up over 6% of them, then linear decay.
sched = get_linear_schedule_with_warmup(opt, int(total * 0.06 + 0.5), total)


def batch(texts):
    """text + EOS, truncated, right-padded; labels -100 on padding (Tessera's causal-lm batches)."""
    seqs = [(tok.encode(t).ids + [eos])[: args.max_length] for t in texts]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), eos)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, ids.masked_fill(mask == 0, -100)


seen, start = 0, None
for step in range(args.warmup_steps + args.steps):
    if step == args.warmup_steps:
        finish()
        start, seen = time.perf_counter(), 0
    i = step * args.batch_size
    ids, mask, labels = batch(train[i:i + args.batch_size])
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    if args.method == "adalora" and not args.full:  # PEFT's loop: allocate after the step, before zero_grad
        model.base_model.update_and_allocate(step)
    seen += ids.size(0)
finish()
elapsed = time.perf_counter() - start
print(json.dumps({"peer": "transformers" if args.full else "transformers+peft", "examples_per_s": seen / elapsed, "loss": loss.item(), "steps": args.steps}))
