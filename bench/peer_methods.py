"""The peft side of bench/method_toml.sh: the same reparameterized method for the peers
(peer_hf_peft.py, peer_lm_peft.py), and the optimizer PEFT users step it with."""
import torch

REPARAMETERIZED = ("lora", "lora_fa", "dora", "adalora", "loha", "lokr", "vera")


def peft_config(method, targets, total_steps, rank=8, task_type=None, fan_in_fan_out=False):
    """targets: peft target_modules; total_steps: AdaLoRA's schedule (budget phase over the first fifth)."""
    import peft

    common = dict(target_modules=targets, task_type=task_type)
    if method == "adalora":
        return peft.AdaLoraConfig(init_r=12, target_r=8, lora_alpha=32, tinit=total_steps // 10, tfinal=total_steps // 5, deltaT=1,
                                  total_step=total_steps, orth_reg_weight=0.1, **common)
    if method == "loha":
        return peft.LoHaConfig(r=rank, alpha=2 * rank, **common)
    if method == "lokr":
        return peft.LoKrConfig(r=rank, alpha=2 * rank, **common)
    if method == "vera":
        return peft.VeraConfig(r=256, fan_in_fan_out=fan_in_fan_out, **common)
    if method in ("lora", "lora_fa", "dora"):
        return peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.1, use_dora=method == "dora", fan_in_fan_out=fan_in_fan_out, **common)
    raise ValueError(f"no peft config for {method}")


class _Both:
    """Several optimizers stepped as one."""

    def __init__(self, *opts):
        self.opts = opts

    def zero_grad(self):
        for o in self.opts:
            o.zero_grad()

    def step(self):
        for o in self.opts:
            o.step()


def adalora_orth_reg(peft_model):
    """AdaLoRA's orthogonality term, w · mean over A and B of ‖AAᵀ − I‖_F, ‖BᵀB − I‖_F, as peft's
    AdaLoraModel.forward adds it to a model's own loss: a peer whose task head computes the loss
    outside the PeftModel adds it itself, or AdaLoRA there would train without it."""
    w = peft_model.peft_config["default"].orth_reg_weight
    terms = [torch.linalg.matrix_norm((p @ p.T if "lora_A" in n else p.T @ p) - torch.eye(p.shape[0] if "lora_A" in n else p.shape[1]))
             for n, p in peft_model.named_parameters() if ("lora_A" in n or "lora_B" in n) and p.requires_grad]
    return w * torch.stack(terms).mean()


def optimizer(method, peft_model, extra_params=(), rank=8, lr=1e-3, weight_decay=0.01, lora_alpha=None):
    """AdamW over what trains; LoRA-FA: PEFT's create_lorafa_optimizer over the adapter (A frozen,
    B's gradient projected), AdamW over extra_params (a task head)."""
    if method != "lora_fa":
        return torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad] + list(extra_params), lr=lr, weight_decay=weight_decay)
    from peft.optimizers import create_lorafa_optimizer

    fa = create_lorafa_optimizer(peft_model, r=rank, lora_alpha=lora_alpha or 2 * rank, lr=lr, weight_decay=weight_decay)
    extra = list(extra_params)
    return _Both(fa, torch.optim.AdamW(extra, lr=lr, weight_decay=weight_decay)) if extra else fa
