"""Real architectures at real sizes with random weights, made by transformers
(save_pretrained) for the benchmarks: speed does not depend on the values.
  gpt2-small   GPT-2 small (124 M)
  llama-110m   a LLaMA with grouped-query attention (~110 M)
  t5-small     T5-small (60 M)
usage: make_checkpoints.py OUT_DIR"""
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration
from transformers.utils import logging

logging.disable_progress_bar()

out = sys.argv[1]
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config()).save_pretrained(f"{out}/gpt2-small")
LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048)).save_pretrained(f"{out}/llama-110m")
T5ForConditionalGeneration(T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                                    decoder_start_token_id=0)).save_pretrained(f"{out}/t5-small")
