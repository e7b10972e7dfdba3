// A LLaMA-family GGUF file (llama.cpp's tensor names and metadata) read as the Hugging Face
// checkpoint it was converted from: the config.json fields from the `llama.*` and
// `tokenizer.ggml.*` metadata, and each tensor under its Hugging Face name — q and k
// un-permuted, since llama.cpp's converter reorders their rows per head for its rotary
// kernel (rows (h, 2, d/2) of each head become (h, d/2, 2); this is the inverse).
//
//   token_embd ↔ model.embed_tokens      blk.N.attn_q/k/v/output ↔ model.layers.N.self_attn.{q,k,v,o}_proj
//   output_norm ↔ model.norm             blk.N.ffn_gate/up/down ↔ model.layers.N.mlp.{gate,up,down}_proj
//   output ↔ lm_head (absent: tied)      blk.N.attn_norm / ffn_norm ↔ model.layers.N.input_layernorm / post_attention_layernorm
#pragma once

#include "formats/gguf.h"

#include <c10/core/TensorOptions.h>

#include <map>
#include <memory>
#include <optional>
#include <string>

namespace tessera {

class StoredTensor;

// config.json's fields for a LlamaForCausalLM; throws GgufError naming a missing key or an
// architecture other than llama.
nlohmann::json llama_config_from_gguf(const GgufFile& file);

// The Hugging Face name of a llama.cpp tensor name, or nullopt for a name outside the map.
std::optional<std::string> hf_name_from_gguf(const std::string& gguf_name);

// The tensor `gguf_name` as float32 in the Hugging Face layout (q and k un-permuted).
at::Tensor hf_tensor_from_gguf(const GgufFile& file, const std::string& gguf_name);

// Hugging Face name -> llama.cpp name, for every tensor of the file the map covers.
std::map<std::string, std::string> gguf_names_by_hf(const GgufFile& file);

// A parameter site's base kept as the file's own blocks ([model] quantize = "gguf"): Q4_1 stays
// Q4_1, read from the mapping (copied once to a non-CPU device), and each product
// dequantizes it (and un-permutes q and k) into `options`, the model's compute dtype and device.
std::unique_ptr<StoredTensor> gguf_storage(std::shared_ptr<const GgufFile> file, const std::string& gguf_name, c10::TensorOptions options);
// For such a storage about to be replaced (its weight quantized again, or made dense): gives
// back the file's mapped pages of its blocks (GgufFile::release_pages). 0 for any other storage.
std::size_t release_file_pages(const StoredTensor& storage);

}  // namespace tessera
