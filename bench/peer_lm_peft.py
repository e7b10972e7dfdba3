"""The peer of bench/lm_lora_vs_peft.sh: LoRA (or --method: one of its relatives, as
bench/peer_methods.py builds them) causal-LM fine-tuning with transformers + peft
on the same torch, checkpoint, tokenizer, batches (Tessera's seeded split, consecutive
batches), targets, rank, learning-rate schedule and threads — or, with --full, full
fine-tuning of every weight (bench/fish_memory.sh's reference). Prints one JSON line:
examples/s over the timed steps and the last step's loss."""
import argparse
import json
import math
import time

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

from peer_methods import REPARAMETERIZED, optimizer, peft_config
from peer_split import seeded_shuffle, split_rows, train_rows

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
ap.add_argument("--peft-config", default="", help='{"class": peft config class, "kwargs": {...}}: this config instead of --method\'s')
ap.add_argument("--adapterhub", default="", help='{"config": AdapterHub preset, "kwargs": {...}}: that adapter through AdapterHub\'s adapters '
                                                 '(run by its own venv\'s python) instead of peft')
ap.add_argument("--epochs", type=int, default=0, help="0: the timing mode (--steps consecutive batches); N: Tessera's epochs, then the test perplexity")
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--weight-decay", type=float, default=0.01)
ap.add_argument("--warmup-ratio", type=float, default=0.06)
ap.add_argument("--max-grad-norm", type=float, default=1.0)
ap.add_argument("--seed", type=int, default=42, help="epochs mode: [train] seed (the batch order's and the initialisation's)")
ap.add_argument("--limit", type=int, default=0, help="epochs mode: [data] limit")
ap.add_argument("--split-seed", type=int, default=13, help="epochs mode: [data] seed")
ap.add_argument("--no-shuffle", action="store_true", help="epochs mode: [train] shuffle = false")
ap.add_argument("--no-group-by-length", action="store_true", help="epochs mode: [train] group_by_length = false")
ap.add_argument("--eval-batch-size", type=int, default=32)
args = ap.parse_args()
device = torch.device(args.device)
finish = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # the clock waits for the device
torch.set_num_threads(args.threads)
torch.manual_seed(args.seed if args.epochs else 0)

if args.epochs:
    train_split, test_split = split_rows(args.data, args.test_fraction, args.split_seed, args.limit)
    train, test = [r["text"] for r in train_split], [r["text"] for r in test_split]
else:
    train = [r["text"] for r in train_rows(args.data, args.test_fraction)]

tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
hub = json.loads(args.adapterhub) if args.adapterhub else None  # {"config": preset, "kwargs": {...}}
if args.quantize == "nf4":  # QLoRA as PEFT users run it: bitsandbytes NF4, double quantization, prepare_model_for_kbit_training
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, quantization_config=q, device_map=args.device)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
else:
    # AdapterHub's prefix on LLaMA pads the attention mask with ones and inverts it, which is
    # right for eager attention's additive float mask and wrong for SDPA's boolean one (every
    # prefix column masked out) or its absent one (is_causal aligned top-left over prefix +
    # tokens): its presets with a prefix (MAM, UniPELT) run on eager attention.
    prefix_preset = hub is not None and hub["config"] in ("mam", "unipelt", "prefix_tuning")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, **({"attn_implementation": "eager"} if prefix_preset else {}))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
eos = model.config.eos_token_id
eos = eos[0] if isinstance(eos, list) else eos


def encode(text):
    """text + EOS, truncated (Tessera's causal-lm examples)."""
    return (tok.encode(text).ids + [eos])[: args.max_length]


def epoch_batches(lengths, epoch):
    """Tessera's batches of one epoch (host/train/trainer.cpp's epoch_batches): a seeded shuffle,
    windows of 50 batches sorted longest first, the batches visited in a seeded order."""
    seed = (args.seed * 1000003 + epoch) & ((1 << 64) - 1)
    order = list(range(len(lengths)))
    if not args.no_shuffle:
        seeded_shuffle(order, seed)
    window = 50 * args.batch_size
    if not args.no_group_by_length:
        order = [i for w in range(0, len(order), window) for i in sorted(order[w:w + window], key=lambda i: -lengths[i])]
    batches = [order[b:b + args.batch_size] for b in range(0, len(order), args.batch_size)]
    if not args.no_group_by_length:
        visit = list(range(len(batches)))
        seeded_shuffle(visit, seed ^ 0xBA7C4)
        batches = [batches[i] for i in visit]
    return batches


if args.epochs:
    train_ids = [encode(t) for t in train]
    per_epoch = math.ceil(len(train) / args.batch_size)
    total = per_epoch * args.epochs
else:
    total = args.warmup_steps + args.steps
if args.peft_config:  # the run's own method keys, mapped by bench/assess_peers.py
    import peft

    spec = json.loads(args.peft_config)
    if spec["class"] == "AdaLoraConfig":  # its budget schedule spans the run's steps
        spec["kwargs"]["total_step"] = total
    if spec["class"] == "PromptTuningConfig" and spec["kwargs"].get("prompt_tuning_init") == "TEXT":
        spec["kwargs"]["tokenizer_name_or_path"] = args.model
    config = getattr(peft, spec["class"])(task_type="CAUSAL_LM", **spec["kwargs"])
elif args.adapterhub:  # the preset with the run's own keys; train_adapter freezes the rest
    import adapters

    config = None
    adapters.init(model)
    model.add_adapter("a", config=adapters.AdapterConfig.load(hub["config"], **hub["kwargs"]))
    model.train_adapter("a")
elif not args.full:
    config = peft_config(args.method, args.targets.split(","), total, task_type="CAUSAL_LM", fan_in_fan_out=args.fan_in_fan_out)
if not args.full and not args.adapterhub:
    from peft import get_peft_model

    # CAUSAL_LM: peft's causal-LM wrapper calls its tuner's forward, where AdaLoRA adds its
    # orthogonality term to the loss (a bare PeftModel skips that forward, and the term with it).
    model = get_peft_model(model, config)
model = model.to(device)
model.train()
lr, wd = (args.lr, args.weight_decay) if args.epochs else (1e-3, 0.01)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=wd) if args.full else \
    optimizer(args.method, model, rank=getattr(config, "r", 8), lr=lr, weight_decay=wd, lora_alpha=getattr(config, "lora_alpha", None))
params = [p for p in model.parameters() if p.requires_grad]  # LoRA-FA: lora_A frozen by its optimizer's set-up
# Tessera's schedule over the same steps: linear warm-up over a share of them, then linear decay.
sched = get_linear_schedule_with_warmup(opt, int(total * (args.warmup_ratio if args.epochs else 0.06) + 0.5), total)


def batch(texts=None, seqs=None):
    """text + EOS, truncated, right-padded; labels -100 on padding (Tessera's causal-lm batches)."""
    seqs = seqs if seqs is not None else [encode(t) for t in texts]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), eos)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, ids.masked_fill(mask == 0, -100)


ADALORA = not args.full and not args.adapterhub and type(model.peft_config["default"]).__name__ == "AdaLoraConfig"


def train_step(ids, mask, labels, step):
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    opt.zero_grad()
    loss.backward()
    clip = args.max_grad_norm if args.epochs else 1.0
    if clip > 0:  # Tessera's max_grad_norm = 0: no clipping
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    sched.step()
    if ADALORA:  # PEFT's loop: allocate after the step, before zero_grad
        model.base_model.update_and_allocate(step)
    return loss


peer = "transformers" if args.full else "transformers+adapters" if args.adapterhub else "transformers+peft"
if not args.epochs:
    seen, start = 0, None
    for step in range(args.warmup_steps + args.steps):
        if step == args.warmup_steps:
            finish()
            start, seen = time.perf_counter(), 0
        i = step * args.batch_size
        ids, mask, labels = batch(train[i:i + args.batch_size])
        loss = train_step(ids, mask, labels, step)
        seen += ids.size(0)
    finish()
    elapsed = time.perf_counter() - start
    print(json.dumps({"peer": peer, "examples_per_s": seen / elapsed, "loss": loss.item(), "steps": args.steps}))
else:
    seen, tokens, timed, step = 0, 0, 0.0, 0
    lengths = [len(s) for s in train_ids]
    for epoch in range(args.epochs):
        for rows in epoch_batches(lengths, epoch):
            ids, mask, labels = batch(seqs=[train_ids[i] for i in rows])
            finish()
            t0 = time.perf_counter()
            loss = train_step(ids, mask, labels, step)
            loss.item()
            finish()
            if step >= args.warmup_steps:  # as Tessera times: the steps after the first few
                timed += time.perf_counter() - t0
                seen, tokens = seen + ids.size(0), tokens + int(mask.sum())
            step += 1
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(test), args.eval_batch_size):
            ids, mask, labels = batch(test[i:i + args.eval_batch_size])
            # Tessera's targets: text position t predicts token t + 1 (the first text token is no
            # target). A prompt's virtual positions come first in peft's logits: dropped, so the
            # last of them predicting the first text token counts on neither side.
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -ids.size(1):]
            target = labels[:, 1:]
            nll += torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    print(json.dumps({"peer": peer, "examples_per_s": seen / max(timed, 1e-9), "tokens_per_s": tokens / max(timed, 1e-9),
                      "test_perplexity": math.exp(nll / max(count, 1)), "test_tokens": count, "epochs": args.epochs, "steps": step,
                      "threads": args.threads, "batch_size": args.batch_size}))
