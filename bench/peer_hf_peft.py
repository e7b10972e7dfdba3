"""The peer: the same LoRA fine-tune as configs/quickstart.toml with transformers + peft
on the same torch — or (IA)³ with peft, or a bottleneck adapter preset with AdapterHub's
`adapters` (run by the adapters venv's python: its transformers differs from ours). Prints
one JSON line: examples/s over the timed steps and peak RSS."""
import argparse
import json
import os
import time

import torch
from transformers import AutoModel, AutoTokenizer

from peer_methods import REPARAMETERIZED, adalora_orth_reg, optimizer, peft_config
from peer_split import train_rows

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
ap.add_argument("--method", choices=["lora", "lora_fa", "dora", "adalora", "loha", "lokr", "vera", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning", "seq_bn", "double_seq_bn", "par_bn", "scaled_par_bn", "compacter", "compacter++", "mam", "unipelt"],
                default="lora",
                help="ia3: IA3Config with PEFT's defaults for BERT; prompt_tuning, p_tuning, prefix_tuning: 20 virtual tokens "
                     "(P-tuning's MLP encoder, prefix tuning without projection); the *_bn and compacter, compacter++: AdapterHub's bottleneck presets (adapters); mam, unipelt: its MAMConfig and UniPELTConfig")
ap.add_argument("--quantize", choices=["none", "nf4"], default="none", help="nf4: QLoRA, the base in bitsandbytes 4-bit with double quantization")
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)

train = train_rows(args.data)  # [data] test_fraction = 0.2, seed = 13
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


if args.method in ("lora", "lora_fa", "dora", "adalora", "loha", "lokr", "vera", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning"):
    from peft import IA3Config, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

    if args.method == "prompt_tuning":
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
    encoder.add_adapter("a", config=args.method)
    encoder.train_adapter("a")
    model = Classifier(encoder)
for p in model.head.parameters():
    p.requires_grad_(True)
model.train()
opt = optimizer(args.method, model.encoder, model.head.parameters(), args.rank) if args.method in REPARAMETERIZED else \
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
params = [p for p in model.parameters() if p.requires_grad]  # LoRA-FA: lora_A frozen by its optimizer's set-up

seen, start = 0, None
for step in range(args.warmup_steps + args.steps):
    if step == args.warmup_steps:
        start, seen = time.perf_counter(), 0
    # Consecutive batches from the start of the file: the same ones Tessera sees with shuffle = false.
    i = step * args.batch_size
    batch = tok(texts[i:i + args.batch_size], padding=args.padding, truncation=True, max_length=args.max_length, return_tensors="pt")
    y = torch.tensor(labels[i:i + args.batch_size])
    # bf16: the peer's usual mixed precision on CPU (autocast), f32 master weights.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
        logits = model(batch["input_ids"], batch["attention_mask"])
    loss = torch.nn.functional.cross_entropy(logits.float(), y)
    if args.method == "adalora":
        loss = loss + adalora_orth_reg(model.encoder)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if args.method == "adalora":  # PEFT's loop: allocate after the step, before zero_grad
        model.encoder.base_model.update_and_allocate(step)
    seen += y.numel()
elapsed = time.perf_counter() - start
print(json.dumps({"peer": "transformers+peft", "examples_per_s": seen / elapsed,
                  "threads": args.threads, "dtype": args.dtype, "steps": args.steps, "batch_size": args.batch_size}))
