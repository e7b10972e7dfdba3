// The storage stage: how a model's base weights are kept, chosen before any method
// exists ([model] quantize). "none" keeps the checkpoint's tensors (memory-mapped);
// "nf4" keeps every linear weight of the layers as QLoRA's 4-bit NormalFloat blocks
// (formats/nf4.h), "fp4" as bitsandbytes' 4-bit float blocks (the same file), "int8" as
// LLM.int8()'s rows (formats/int8.h); "gguf" keeps them as the GGUF file's own blocks (Q4_1 stays Q4_1:
// formats/gguf_llama.h) — the LM / MLM heads, the embeddings and what the architecture keeps
// dense (T5's wo) stay dense, as transformers' 4-bit loading leaves them — and each product
// dequantizes its weight first, so methods
// see the same sites, shapes and interventions as over a dense base.
#pragma once

#include "architectures/site_model.h"

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace tessera {

// `quantize` ("none", "nf4", "fp4", "int8", "gguf") for the layers' linear weights, and what methods asked for
// (tessera.method.storage): linear site's canonical name -> storage, for any linear site.
// "gguf" reads the blocks from `source`, the GGUF file the model was loaded from.
// Returns how many weights were converted. GPT-2's q/k/v views of the fused c_attn keep
// their dense rows (so does c_attn's memory, while they view it); a method asking for a
// view is refused (ask for attn.qkv).
// `overrides` ([model] quantize_targets): target patterns (as methods' targets) and the
// format of the layers' linear weights they match, over `quantize`; a method's request wins
// over both. A pattern matching no layer weight, or two asking differently of one, is refused.
std::size_t store_weights(SiteModel& model, const std::string& quantize, bool double_quant,
                          const std::map<std::string, std::string>& requested = {}, const std::string& source = "",
                          const std::vector<std::pair<std::string, std::string>>& overrides = {});

}  // namespace tessera
