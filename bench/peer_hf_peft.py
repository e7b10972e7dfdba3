"""The peer: the same LoRA fine-tune as configs/quickstart.toml with transformers + peft
on the same torch — or (IA)³ with peft, or a bottleneck adapter preset with AdapterHub's
`adapters` (run by the adapters venv's python: its transformers differs from ours). Prints
one JSON line: examples/s over the timed steps and peak RSS. With --epochs N it trains as
Tessera's [train] does instead (a seeded shuffle each epoch, padding to the batch's longest,
linear warm-up and decay, the head at its own rate) over the train split and adds the test
split's accuracy: the peer column of `tessera assess --peers` (bench/assess_peers.py)."""
import math
import argparse
import json
import os
import time

import torch
from transformers import AutoModel, AutoTokenizer

from peer_methods import REPARAMETERIZED, adalora_orth_reg, optimizer, peft_config
from peer_split import split_rows

BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]

ap = argparse.ArgumentParser()
ap.add_argument("--model", default=os.environ.get("TESSERA_MODEL_DIR"))
ap.add_argument("--data", default=os.path.join(os.environ.get("TESSERA_DATA_DIR", ""), "polarity.csv"))
ap.add_argument("--steps", type=int, default=30)
ap.add_argument("--warmup-steps", type=int, default=3)
ap.add_argument("--batch-size", type=int, default=32)
ap.add_argument("--max-length", type=int, default=64)
ap.add_argument("--threads", type=int, default=os.cpu_count())
ap.add_argument("--rank", type=int, default=8)
ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
ap.add_argument("--padding", choices=["max_length", "longest"], default="max_length")
ap.add_argument("--method", choices=["full", "ln_tuning", "lora", "lora_fa", "dora", "adalora", "loha", "lokr", "vera", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning", "seq_bn", "double_seq_bn", "par_bn", "scaled_par_bn", "compacter", "compacter++", "mam", "unipelt"],
                default="lora",
                help="ia3: IA3Config with PEFT's defaults for BERT; prompt_tuning, p_tuning, prefix_tuning: 20 virtual tokens "
                     "(P-tuning's MLP encoder, prefix tuning without projection); the *_bn and compacter, compacter++: AdapterHub's bottleneck presets (adapters); mam, unipelt: its MAMConfig and UniPELTConfig")
ap.add_argument("--adapterhub-kwargs", default="{}", help="the *_bn and compacter presets: {key: value} over the preset's (AdapterConfig.load)")
ap.add_argument("--quantize", choices=["none", "nf4"], default="none", help="nf4: QLoRA, the base in bitsandbytes 4-bit with double quantization")
ap.add_argument("--epochs", type=int, default=0, help="0: the timing mode (--steps consecutive batches of the file); N: train N epochs, then evaluate")
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--head-lr", type=float, default=0.0, help="0: --lr")
ap.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping (Tessera's [train] max_grad_norm = 0)")
ap.add_argument("--weight-decay", type=float, default=0.01)
ap.add_argument("--warmup-ratio", type=float, default=0.06)
ap.add_argument("--seed", type=int, default=42, help="epochs mode: the shuffle's and the initialisation's seed")
ap.add_argument("--limit", type=int, default=0, help="[data] limit")
ap.add_argument("--split-seed", type=int, default=13, help="[data] seed")
ap.add_argument("--test-fraction", type=float, default=0.2)
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(args.seed if args.epochs else 0)

train, test = split_rows(args.data, args.test_fraction, args.split_seed, args.limit)
texts = [r["text"] for r in train]
labels = [int(r["label"]) for r in train]

tok = AutoTokenizer.from_pretrained(args.model)
if args.quantize == "nf4":  # QLoRA as PEFT users run it: bitsandbytes NF4 with double quantization
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    encoder = AutoModel.from_pretrained(args.model, quantization_config=q, device_map="cpu")
else:
    encoder = AutoModel.from_pretrained(args.model)


class Classifier(torch.nn.Module):
    """Mean pooling + linear head, as Tessera's sequence-classification task."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, 2)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        h = h[:, h.shape[1] - input_ids.shape[1]:]  # the text's tokens (a prompt's virtual tokens dropped)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1e-9))


if args.method == "full":  # full fine-tuning as transformers users run it: every parameter trains
    model = Classifier(encoder)
elif args.method in ("ln_tuning", "lora", "lora_fa", "dora", "adalora", "loha", "lokr", "vera", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning"):
    from peft import IA3Config, LNTuningConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

    if args.method == "ln_tuning":  # every LayerNorm, as configs/ln-tuning-minilm.toml
        cfg = LNTuningConfig(target_modules=["LayerNorm"])
    elif args.method == "prompt_tuning":
        cfg = PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=20)
    elif args.method == "p_tuning":
        cfg = PromptEncoderConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=20)
    elif args.method == "prefix_tuning":
        cfg = PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=20)
    elif args.method in REPARAMETERIZED:  # bench/method_toml.sh's settings
        cfg = peft_config(args.method, BERT_TARGETS, args.warmup_steps + args.steps, args.rank)
    else:
        cfg = IA3Config()  # PEFT's defaults for BERT: key, value, output.dense (feed-forward: output.dense)
    model = Classifier(get_peft_model(encoder, cfg))
else:  # AdapterHub: the preset by name, as its users add one; train_adapter freezes the rest
    import adapters

    adapters.init(encoder)
    kwargs = json.loads(args.adapterhub_kwargs)  # the run's own keys over the preset's
    encoder.add_adapter("a", config=adapters.AdapterConfig.load(args.method, **kwargs) if kwargs else args.method)
    encoder.train_adapter("a")
    model = Classifier(encoder)
for p in model.head.parameters():
    p.requires_grad_(True)
model.train()
ADAPTERHUB = args.method.endswith("_bn") or args.method.startswith("compacter") or args.method in ("mam", "unipelt")
peer_name = "transformers+adapters" if ADAPTERHUB else "transformers" if args.method == "full" else "transformers+peft"
lr = args.lr if args.epochs else 1e-3
opt = optimizer(args.method, model.encoder, model.head.parameters(), args.rank, lr=lr) if args.method in REPARAMETERIZED else \
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=args.weight_decay)
if args.epochs and args.head_lr > 0:  # the head at its own rate, as Tessera's head_lr (LoRA-FA's optimizer keeps one rate)
    for o in getattr(opt, "opts", [opt]):
        for g in o.param_groups:
            if any(p is q for p in g["params"] for q in model.head.parameters()):
                g["params"] = [p for p in g["params"] if not any(p is q for q in model.head.parameters())]
    first = getattr(opt, "opts", [opt])[-1]
    first.add_param_group({"params": list(model.head.parameters()), "lr": args.head_lr, "weight_decay": args.weight_decay})
params = [p for p in model.parameters() if p.requires_grad]  # LoRA-FA: lora_A frozen by its optimizer's set-up


def step(batch_texts, batch_labels, at):
    batch = tok(batch_texts, padding=args.padding, truncation=True, max_length=args.max_length, return_tensors="pt")
    y = torch.tensor(batch_labels)
    # bf16: the peer's usual mixed precision on CPU (autocast), f32 master weights.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
        logits = model(batch["input_ids"], batch["attention_mask"])
    loss = torch.nn.functional.cross_entropy(logits.float(), y)
    if args.method == "adalora":
        loss = loss + adalora_orth_reg(model.encoder)
    opt.zero_grad()
    loss.backward()
    if args.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    opt.step()
    if args.method == "adalora":  # PEFT's loop: allocate after the step, before zero_grad
        model.encoder.base_model.update_and_allocate(at)
    return y.numel()


if not args.epochs:
    seen, start = 0, None
    for at in range(args.warmup_steps + args.steps):
        if at == args.warmup_steps:
            start, seen = time.perf_counter(), 0
        # Consecutive batches from the start of the file: the same ones Tessera sees with shuffle = false.
        i = at * args.batch_size
        seen += step(texts[i:i + args.batch_size], labels[i:i + args.batch_size], at)
    elapsed = time.perf_counter() - start
    print(json.dumps({"peer": peer_name, "examples_per_s": seen / elapsed,
                      "threads": args.threads, "dtype": args.dtype, "steps": args.steps, "batch_size": args.batch_size}))
else:
    per_epoch = math.ceil(len(texts) / args.batch_size)
    total = per_epoch * args.epochs
    warm = int(total * args.warmup_ratio)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: s / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))
                 for o in getattr(opt, "opts", [opt])]
    g = torch.Generator().manual_seed(args.seed)
    seen, timed, at = 0, 0.0, 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(texts), generator=g).tolist()
        for b in range(per_epoch):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            t0 = time.perf_counter()
            n = step([texts[k] for k in idx], [labels[k] for k in idx], at)
            for sch in schedules:
                sch.step()
            if at >= args.warmup_steps:  # as Tessera times: the steps after the first few
                timed += time.perf_counter() - t0
                seen += n
            at += 1
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(test), 128):
            rows = test[i:i + 128]
            batch = tok([r["text"] for r in rows], padding="longest", truncation=True, max_length=args.max_length, return_tensors="pt")
            pred = model(batch["input_ids"], batch["attention_mask"]).argmax(-1)
            right += int((pred == torch.tensor([int(r["label"]) for r in rows])).sum())
    print(json.dumps({"peer": peer_name, "examples_per_s": seen / max(timed, 1e-9), "test_accuracy": right / len(test),
                      "test_examples": len(test), "epochs": args.epochs, "steps": at, "threads": args.threads, "batch_size": args.batch_size}))
