// What a method sees of the base model: its shape and its sites. The host owns the
// model and every site; a method keeps raw pointers to sites only while it is attached
// (the host detaches methods before it destroys a model).
#pragma once

#include <tessera/sites.h>

#include <c10/core/TensorOptions.h>

#include <string>
#include <vector>

namespace tessera {

struct ModelInfo {
  std::string architecture;     // "bert"
  std::int64_t hidden_size = 0;
  std::int64_t num_layers = 0;
  std::int64_t num_heads = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t vocab_size = 0;
  c10::TensorOptions options;        // device and compute dtype of activations and base weights
  c10::TensorOptions param_options;  // device and dtype (f32) of trainable tensors: with a bf16
                                     // model they are master weights, cast to `options` in forward
};

class ModelView {
 public:
  virtual ~ModelView() = default;
  virtual const ModelInfo& info() const = 0;
  // Training mode: dropout and other train-only behaviour of methods follow it.
  virtual bool training() const = 0;
  virtual std::vector<LinearSite*> linear_sites() = 0;
  virtual std::vector<SublayerSite*> sublayer_sites() = 0;
  virtual std::vector<AttentionSite*> attention_sites() = 0;
  virtual std::vector<LayerSite*> layer_sites() = 0;
  virtual EmbeddingSite* embedding_site() = 0;
  virtual std::vector<ParameterSite*> parameter_sites() = 0;

  // Sites whose canonical name or Hugging Face path matches any target (see matches()).
  std::vector<LinearSite*> match_linear(const std::vector<std::string>& targets);
  std::vector<SublayerSite*> match_sublayers(const std::vector<std::string>& targets);
  std::vector<ParameterSite*> match_parameters(const std::vector<std::string>& targets);
};

// Target syntax, tried against both names of a site:
//   "re:<regex>"        the whole name matches the ECMAScript regex
//   a glob (* ? [...])  the whole name matches the glob, '*' also crossing dots
//   anything else       the name equals it or ends with "." + it (HF PEFT's rule), so
//                       "attn.q" picks every layer's query and "query" the HF one.
bool matches(const std::string& target, const std::string& name);
bool matches_any(const std::vector<std::string>& targets, const std::string& canonical,
                 const std::string& hf_path);

}  // namespace tessera
