// What HF PEFT's prompt-learning methods (prompt tuning, P-tuning, prefix tuning) share in
// Tessera's plugins: the virtual-token table's rows, the task type PEFT needs to apply a
// prompt when it loads the folder, the adapter_config.json fields every one of them writes,
// and the check of a loaded `prompt_embeddings`. Header-only, SDK-only, like the plugins.
#pragma once

#include <tessera/method.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/StringUtil.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <stdexcept>
#include <string>

namespace tessera::peft_prompt {

// PyTorch's default initialisation of Linear and LSTM weights and biases, which PEFT's prompt
// encoders keep: U(−1/√fan, 1/√fan). Not yet requiring grad (a caller may zero it first).
inline at::Tensor torch_default_uniform(at::IntArrayRef shape, std::int64_t fan, const c10::TensorOptions& opts) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(fan));
  at::Tensor t = at::empty(shape, opts);
  at::NoGradGuard no_grad;
  return t.uniform_(-bound, bound);
}

// The keys every prompt-learning method takes, with PEFT's names.
inline std::vector<ParamSpec> common_params() {
  return {
      {"num_virtual_tokens", ParamType::Int, std::int64_t{20}, "virtual tokens P", 1.0, 4096.0, {}},
      {"num_transformer_submodules", ParamType::Int, std::int64_t{0},
       "PEFT's table multiplier: 0 picks PEFT's (2 for T5, which saves a second, unused block of rows; 1 otherwise)", 0.0, 2.0, {}},
  };
}

// PEFT's num_transformer_submodules: 2 for a sequence-to-sequence model, 1 otherwise (PEFT
// lays its tables and caches out by it, so another value would not load there).
inline std::int64_t submodules(const Params& p, const ModelInfo& info) {
  const auto n = p.integer("num_transformer_submodules");
  const std::int64_t expected = info.architecture == "t5" ? 2 : 1;
  if (n > 0 && n != expected)
    throw ParamError("num_transformer_submodules", "num_transformer_submodules = " + std::to_string(n) + " does not fit a " + info.architecture +
                                                       " model: PEFT uses " + std::to_string(expected) + " (or give 0)");
  return expected;
}

// The task type under which PeftModel.from_pretrained applies the prompt (without one, PEFT's
// base class runs the model without it): the backbone's hidden states for encoders, the LM
// for decoders and T5.
inline const char* task_type(const std::string& architecture) {
  if (architecture == "bert" || architecture == "roberta") return "FEATURE_EXTRACTION";
  if (architecture == "t5") return "SEQ_2_SEQ_LM";
  return "CAUSAL_LM";
}

// The layers PEFT counts (config.num_hidden_layers: T5's encoder layers), from the sites.
inline std::int64_t peft_layers(ModelView& model) {
  std::int64_t encoder = 0, all = 0;
  for (auto* a : model.attention_sites()) {
    const auto& n = a->name();
    if (n.rfind("encoder.", 0) == 0 && n.size() > 5 && n.compare(n.size() - 5, 5, ".attn") == 0) ++encoder;
    if (n.size() > 5 && n.compare(n.size() - 5, 5, ".attn") == 0) ++all;
  }
  return model.info().architecture == "t5" ? encoder : all;
}

// The fields every prompt-learning adapter_config.json holds, as PEFT writes them.
inline nlohmann::json config(const char* peft_type, const ModelInfo& info, std::int64_t tokens, std::int64_t submodules, std::int64_t layers,
                             std::int64_t heads, std::int64_t token_dim) {
  return {{"peft_type", peft_type},
          {"task_type", task_type(info.architecture)},
          {"num_virtual_tokens", tokens},
          {"num_transformer_submodules", submodules},
          {"num_layers", layers},
          {"num_attention_heads", heads},
          {"token_dim", token_dim},
          {"inference_mode", true},
          {"modules_to_save", nullptr},
          {"base_model_name_or_path", nullptr},
          {"revision", nullptr}};
}

// `prompt_embeddings` of the right shape, or an error naming what differs: rows are virtual
// tokens (times PEFT's submodules), columns the model's width (or 2 · layers · width).
inline const at::Tensor& checked_embeddings(const NamedTensors& given, at::IntArrayRef expected, const std::string& rows,
                                            const std::string& columns) {
  const auto it = given.find("prompt_embeddings");
  if (it == given.end()) throw std::runtime_error("adapter lacks tensor 'prompt_embeddings'");
  for (const auto& [k, t] : given)
    if (k != "prompt_embeddings") throw std::runtime_error("tensor '" + k + "' is not part of a prompt-learning adapter (only 'prompt_embeddings')");
  const auto& t = it->second;
  if (t.dim() != 2) throw std::runtime_error("tensor 'prompt_embeddings' has shape " + c10::str(t.sizes()) + ", expected " + c10::str(expected));
  if (t.size(0) != expected[0])
    throw std::runtime_error("tensor 'prompt_embeddings' has " + std::to_string(t.size(0)) + " rows, this adapter has " + std::to_string(expected[0]) +
                             " (" + rows + "): an adapter of another virtual-token count");
  if (t.size(1) != expected[1])
    throw std::runtime_error("tensor 'prompt_embeddings' has " + std::to_string(t.size(1)) + " columns, this model needs " + std::to_string(expected[1]) +
                             " (" + columns + "): an adapter of another model or layer count");
  return t;
}

// Loads `prompt_embeddings` into a prompt table of P · submodules rows (prompt tuning's
// and P-tuning's), or throws naming what differs.
inline void load_table(const NamedTensors& given, at::Tensor& table, std::int64_t tokens, std::int64_t submodules) {
  const auto& t = checked_embeddings(given, table.sizes(), std::to_string(tokens) + " virtual tokens × " + std::to_string(submodules) + " submodules",
                                     "the model's hidden size");
  at::NoGradGuard no_grad;
  table.copy_(t);
}

}  // namespace tessera::peft_prompt
