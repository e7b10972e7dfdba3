"""Checks a model directory `tessera export` wrote against independent references.

  export_check.py lora   BASE ADAPTER OUT   OUT (transformers.AutoModel) computes what peft's
                                            PeftModel(BASE, ADAPTER).merge_and_unload() does
  export_check.py bitfit BASE ADAPTER OUT   OUT's biases are the adapter's saved values, every
                                            other tensor is BASE's bit for bit, and OUT computes
                                            what BASE with those biases does
  export_check.py dtype  OUT TORCH_DTYPE    every float tensor and config.json's torch_dtype
  export_check.py int8lora BASE ADAPTER OUT a LoRA run over a base kept as int8: OUT's layer
                                            weights are bitsandbytes' int8 round trip of BASE's
                                            (LLM.int8()'s rows) with peft's merge added to the
                                            adapted ones; every other tensor is BASE's

Float comparisons: max |a - b| <= 1e-4 * max |b| (CPUs differ in rounding: AVX2, AVX-512).
"""
import json
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

SENTENCES = ["a gripping, beautifully acted film.", "the plot is thin and the jokes fall flat .",
             "it is neither good nor bad, just long."]


def close(name, got, want, rel=1e-4):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= rel * scale, f"{name}: max abs diff {err:.3g} > {rel:g} x {scale:.3g}"
    return err / scale


def hidden(model, tokenizer):
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).last_hidden_state  # (B, T, H)


def same_names(base_dir, out_dir):
    base, out = load_file(f"{base_dir}/model.safetensors"), load_file(f"{out_dir}/model.safetensors")
    assert base.keys() == out.keys(), f"tensor names differ: {sorted(base.keys() ^ out.keys())}"
    for k in base:
        assert out[k].dtype == base[k].dtype and out[k].shape == base[k].shape, k
    return base, out


def check_lora(base_dir, adapter, out_dir):
    from peft import PeftModel
    base, out = same_names(base_dir, out_dir)
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), adapter)
    b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert b and all(p.abs().max() > 0 for p in b), "LoRA's B is zero: the test would not see the merge"
    reference = peft_model.merge_and_unload()
    changed = [k for k in base if not torch.equal(base[k], out[k])]
    assert len(changed) == len(b) and all(".query." in k or ".value." in k for k in changed), changed
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    want, before = hidden(reference, tokenizer), hidden(AutoModel.from_pretrained(base_dir), tokenizer)
    assert (before - want).abs().max() > 1e-2 * want.abs().max(), "the merge barely moves the outputs: the test would not see it"
    err = close("exported vs peft merged", hidden(AutoModel.from_pretrained(out_dir), tokenizer), want)
    print(f"lora: {len(changed)} weights merged, last_hidden_state within {err:.2g} (relative)")


def check_bitfit(base_dir, adapter, out_dir):
    base, out = same_names(base_dir, out_dir)
    saved = {k.removeprefix("base_model.model."): v for k, v in load_file(f"{adapter}/adapter_model.safetensors").items()}
    assert saved and all(k.endswith(".bias") and k in base for k in saved), sorted(saved)
    assert any(not torch.equal(saved[k], base[k]) for k in saved), "no bias moved: the test would not see the merge"
    for k in base:
        if k in saved:
            close(k, out[k], saved[k])
        else:
            assert torch.equal(out[k], base[k]), f"{k} is not the base's bit for bit"
    reference = AutoModel.from_pretrained(base_dir)
    reference.load_state_dict(saved, strict=False)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    err = close("exported vs base with the saved biases", hidden(AutoModel.from_pretrained(out_dir), tokenizer), hidden(reference, tokenizer))
    print(f"bitfit: {len(saved)} biases, the rest bit for bit the base's; last_hidden_state within {err:.2g} (relative)")


def check_dtype(out_dir, torch_dtype):
    assert json.load(open(f"{out_dir}/config.json"))["torch_dtype"] == torch_dtype
    for k, t in load_file(f"{out_dir}/model.safetensors").items():
        assert not t.is_floating_point() or str(t.dtype) == f"torch.{torch_dtype}", (k, t.dtype)
    print(f"dtype: every float tensor {torch_dtype}")


def check_int8_lora(base_dir, adapter, out_dir):
    import bitsandbytes.functional as bnbf
    from peft import PeftModel
    base, out = same_names(base_dir, out_dir)
    model = AutoModel.from_pretrained(base_dir)
    linear = {f"{n}.weight" for n, m in model.encoder.named_modules() if isinstance(m, torch.nn.Linear)}
    linear = {"encoder." + k for k in linear}
    with torch.no_grad():  # the base as bitsandbytes keeps it in 8 bits, dequantized
        for n, m in model.encoder.named_modules():
            if isinstance(m, torch.nn.Linear):
                cb, scb, _ = bnbf.int8_vectorwise_quant(m.weight.detach().clone())
                m.weight.copy_(bnbf.int8_vectorwise_dequant(cb, scb))
    reference = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    assert len(linear) == 36, sorted(linear)
    merged = 0
    for k in base:
        if k in linear:
            close(k, out[k], reference[k], rel=1e-6)
            merged += not torch.equal(reference[k], bnbf.int8_vectorwise_dequant(*bnbf.int8_vectorwise_quant(base[k].clone())[:2]))
        else:
            assert torch.equal(out[k], base[k]), f"{k} is not the base's bit for bit"
    assert merged == 12, f"{merged} weights moved by the merge"
    print(f"int8lora: 36 layer weights the int8 round trip, {merged} with peft's merge")


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"lora": check_lora, "bitfit": check_bitfit, "dtype": check_dtype, "int8lora": check_int8_lora}[mode](*args)
