#include "formats/gguf_llama.h"

#include <tessera/internal/sites_impl.h>

#include <ATen/ATen.h>

#include <cstring>
#include <regex>
#include <vector>

namespace tessera {
namespace {

const nlohmann::json& need(const GgufFile& f, const std::string& key) {
  if (!f.metadata().contains(key)) throw GgufError(f.path(), "", "metadata has no '" + key + "', which a LLaMA model needs");
  return f.metadata()[key];
}

// The inverse of llama.cpp's per-head row order for rotary q and k, (h, d/2, 2, in) →
// (h, 2, d/2, in), as a row map: row r of the Hugging Face weight is the file's row
// source_row(r). Each of a head's d rows: its half (first or second of the rotary pairs) and
// its pair index i; the file interleaves them.
std::int64_t source_row(std::int64_t r, std::int64_t rows, std::int64_t heads) {
  if (heads == 0) return r;
  const std::int64_t d = rows / heads, head = r / d, half = (r % d) / (d / 2), i = (r % d) % (d / 2);
  return head * d + 2 * i + half;
}

at::Tensor unpermute(const at::Tensor& w, std::int64_t heads) {
  const std::int64_t rows = w.size(0);
  std::vector<std::int64_t> map(static_cast<std::size_t>(rows));
  for (std::int64_t r = 0; r < rows; ++r) map[static_cast<std::size_t>(r)] = source_row(r, rows, heads);
  return w.index_select(0, at::tensor(map, at::kLong).to(w.device()));
}

}  // namespace

nlohmann::json llama_config_from_gguf(const GgufFile& f) {
  const auto arch = need(f, "general.architecture").get<std::string>();
  if (arch != "llama") throw GgufError(f.path(), "", "general.architecture is '" + arch + "': only llama GGUF files are read as a model");
  const std::int64_t hidden = need(f, "llama.embedding_length").get<std::int64_t>(), heads = need(f, "llama.attention.head_count").get<std::int64_t>();
  nlohmann::json c = {{"model_type", "llama"},
                      {"architectures", nlohmann::json::array({"LlamaForCausalLM"})},
                      {"hidden_act", "silu"},
                      {"hidden_size", hidden},
                      {"intermediate_size", need(f, "llama.feed_forward_length")},
                      {"num_hidden_layers", need(f, "llama.block_count")},
                      {"num_attention_heads", heads},
                      {"num_key_value_heads", f.metadata().value("llama.attention.head_count_kv", nlohmann::json(heads))},
                      {"head_dim", f.metadata().value("llama.rope.dimension_count", nlohmann::json(hidden / heads))},
                      {"rms_norm_eps", need(f, "llama.attention.layer_norm_rms_epsilon")},
                      {"rope_theta", f.metadata().value("llama.rope.freq_base", nlohmann::json(10000.0))},
                      {"max_position_embeddings", need(f, "llama.context_length")},
                      {"tie_word_embeddings", !f.has("output.weight")}};
  if (f.metadata().contains("llama.vocab_size")) c["vocab_size"] = f.metadata()["llama.vocab_size"];
  else c["vocab_size"] = need(f, "tokenizer.ggml.tokens").size();
  for (const auto& [ours, theirs] : {std::pair{"bos_token_id", "tokenizer.ggml.bos_token_id"}, {"eos_token_id", "tokenizer.ggml.eos_token_id"},
                                     {"pad_token_id", "tokenizer.ggml.padding_token_id"}, {"unk_token_id", "tokenizer.ggml.unknown_token_id"}})
    if (f.metadata().contains(theirs)) c[ours] = f.metadata()[theirs];
  return c;
}

std::optional<std::string> hf_name_from_gguf(const std::string& n) {
  static const std::map<std::string, std::string> kTop = {
      {"token_embd.weight", "model.embed_tokens.weight"}, {"output_norm.weight", "model.norm.weight"}, {"output.weight", "lm_head.weight"}};
  static const std::map<std::string, std::string> kLayer = {
      {"attn_q", "self_attn.q_proj"}, {"attn_k", "self_attn.k_proj"}, {"attn_v", "self_attn.v_proj"}, {"attn_output", "self_attn.o_proj"},
      {"ffn_gate", "mlp.gate_proj"}, {"ffn_up", "mlp.up_proj"}, {"ffn_down", "mlp.down_proj"},
      {"attn_norm", "input_layernorm"}, {"ffn_norm", "post_attention_layernorm"}};
  if (const auto it = kTop.find(n); it != kTop.end()) return it->second;
  static const std::regex layer(R"(blk\.(\d+)\.([a-z_]+)\.(weight|bias))");
  std::smatch m;
  if (!std::regex_match(n, m, layer)) return std::nullopt;
  const auto it = kLayer.find(m[2].str());
  if (it == kLayer.end()) return std::nullopt;
  return "model.layers." + m[1].str() + "." + it->second + "." + m[3].str();
}

namespace {

// q's heads or k's (key/value) heads for a rotary weight, 0 for any other tensor.
std::int64_t rotary_heads(const GgufFile& f, const std::string& n) {
  static const std::regex rotary(R"(blk\.\d+\.attn_(q|k)\.weight)");
  std::smatch m;
  if (!std::regex_match(n, m, rotary)) return 0;
  const std::int64_t heads = m[1].str() == "q" ? need(f, "llama.attention.head_count").get<std::int64_t>()
                                                : f.metadata().value("llama.attention.head_count_kv", need(f, "llama.attention.head_count")).get<std::int64_t>();
  const std::int64_t rows = f.info(n).shape[0];
  if (heads <= 0 || rows % (2 * heads) != 0)
    throw GgufError(f.path(), n, "has " + std::to_string(rows) + " rows, not a whole number of rotary pairs for " + std::to_string(heads) + " heads");
  return heads;
}

class GgufBlocks final : public StoredTensor {
 public:
  GgufBlocks(std::shared_ptr<const GgufFile> file, const std::string& name, c10::TensorOptions options)
      : file_(std::move(file)), info_(file_->info(name)), heads_(rotary_heads(*file_, name)), options_(options) {
    raw_ = file_->raw(name);
    if (options.device() != raw_.device()) {  // the blocks, once; the mapping's pages are then not needed here
      raw_ = raw_.to(options.device());
      file_->release_pages(name);
    }
  }
  const char* format() const override { return "gguf"; }
  std::size_t release_pages() const { return file_->release_pages(info_.name); }
  Tensor dense() const override {
    const Tensor w = dequantize_gguf(raw_, info_.type, info_.shape);
    return (heads_ > 0 ? unpermute(w, heads_) : w).to(options_);
  }
  std::int64_t stored_bytes() const override { return static_cast<std::int64_t>(info_.bytes); }
  // Q4_0, Q4_1 and Q8_0 rows (32 values a block) on a CPU in f32: a slab at a time.
  std::int64_t column_step() const override {
    const bool blocks = info_.type == 2 || info_.type == 3 || info_.type == 8;
    return blocks && info_.shape.size() == 2 && options_.device().is_cpu() && c10::typeMetaToScalarType(options_.dtype()) == at::kFloat ? 32 : 0;
  }
  std::int64_t rows() const override { return info_.shape.size() == 2 ? info_.shape[0] : 0; }
  // Row r of the un-permuted weight is the file's row source_row(r); each value as
  // dequantize_gguf computes it, product for product.
  void dequantize_row(std::int64_t r, std::int64_t c0, std::int64_t c1, float* out) const override {
    const std::int64_t per_row = info_.shape[1] / 32, bytes = raw_.size(1);
    const auto* row = raw_.data_ptr<std::uint8_t>() + (source_row(r, info_.shape[0], heads_) * per_row + c0 / 32) * bytes;
    for (std::int64_t c = c0; c < c1; c += 32, row += bytes, out += 32) {
      const float d = half(row);
      if (info_.type == 8) {
        const auto* q = reinterpret_cast<const std::int8_t*>(row + 2);
        for (int j = 0; j < 32; ++j) out[j] = static_cast<float>(q[j]) * d;
      } else if (info_.type == 2) {  // low nibbles are values 0..15, high ones 16..31
        for (int j = 0; j < 16; ++j) out[j] = static_cast<float>((row[2 + j] & 15) - 8) * d, out[j + 16] = static_cast<float>((row[2 + j] >> 4) - 8) * d;
      } else {
        const float m = half(row + 2);
        for (int j = 0; j < 16; ++j) out[j] = static_cast<float>(row[4 + j] & 15) * d + m, out[j + 16] = static_cast<float>(row[4 + j] >> 4) * d + m;
      }
    }
  }

 private:
  static float half(const std::uint8_t* p) {
    std::uint16_t bits;
    std::memcpy(&bits, p, 2);
    return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
  }

  std::shared_ptr<const GgufFile> file_;  // keeps the mapping raw_ views
  GgufFile::TensorInfo info_;
  std::int64_t heads_;
  c10::TensorOptions options_;
  Tensor raw_;  // (blocks, bytes per block) uint8
};

}  // namespace

at::Tensor hf_tensor_from_gguf(const GgufFile& f, const std::string& n) {
  const at::Tensor w = f.dequantize(n);
  const std::int64_t heads = rotary_heads(f, n);
  return heads > 0 ? unpermute(w, heads) : w;
}

std::map<std::string, std::string> gguf_names_by_hf(const GgufFile& f) {
  std::map<std::string, std::string> out;
  for (const auto& t : f.tensors())
    if (auto hf = hf_name_from_gguf(t.name)) out[*hf] = t.name;
  return out;
}

std::unique_ptr<StoredTensor> gguf_storage(std::shared_ptr<const GgufFile> file, const std::string& gguf_name, c10::TensorOptions options) {
  return std::make_unique<GgufBlocks>(std::move(file), gguf_name, options.requires_grad(false));
}

std::size_t release_file_pages(const StoredTensor& storage) {
  const auto* blocks = dynamic_cast<const GgufBlocks*>(&storage);
  return blocks != nullptr ? blocks->release_pages() : 0;
}

}  // namespace tessera
