// What a method sees of the base model: its shape, its sites, and the host's extensions.
// The host owns the model and every site; a method keeps pointers to sites only while
// it is attached (the host removes what an instance installed before the model or the
// instance goes).
//
// A handle, like the sites: every function lives in libtessera_sdk, so a minor version
// adds site kinds and facts as new functions, never by changing what a plugin compiled.
#pragma once

#include <tessera/sites.h>

#include <c10/core/TensorOptions.h>

#include <string>
#include <vector>

namespace tessera {

// Filled by the host; a minor version may append fields (plugins only read it).
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
  const ModelInfo& info() const;
  // Training mode: dropout and other train-only behaviour of methods follow it.
  bool training() const;
  std::vector<LinearSite*> linear_sites();
  std::vector<SublayerSite*> sublayer_sites();
  std::vector<AttentionSite*> attention_sites();
  std::vector<LayerSite*> layer_sites();
  EmbeddingSite* embedding_site();  // null when the architecture has none
  std::vector<ParameterSite*> parameter_sites();
#if TESSERA_TARGET_ABI_MINOR >= 1
  OutputSite* output_site();  // since SDK 2.1
#endif

  // Sites whose canonical name or Hugging Face path matches any target (see matches()).
  std::vector<LinearSite*> match_linear(const std::vector<std::string>& targets);
  std::vector<SublayerSite*> match_sublayers(const std::vector<std::string>& targets);
  std::vector<AttentionSite*> match_attention(const std::vector<std::string>& targets);
  std::vector<LayerSite*> match_layers(const std::vector<std::string>& targets);
  std::vector<ParameterSite*> match_parameters(const std::vector<std::string>& targets);

  // Since SDK 2.1: the forward pass being run, for interventions that depend on the batch
  // (per-sample routing, multi-task methods). Read them inside closures.
  //   attention_mask  (B, S) int64, 1 = real token: the layout sublayer, layer and output
  //                   closures see (prompt tokens included; T5's decoder: all ones)
  //   token_samples   (N) int64: the batch row of each of the N rows token-wise closures see
  //                   while the host runs unpadded; undefined while it runs padded
  //   sample_tags     per sample (B), the values of a [data] tag_columns column; empty when
  //                   the run's data has no such column
#if TESSERA_TARGET_ABI_MINOR >= 1
  Tensor attention_mask() const;
  Tensor token_samples() const;
  std::vector<std::string> sample_tags(const std::string& column) const;
#endif

  // A host extension by id ("tessera.host.log", see extensions.h): a table that begins with
  // a tessera_extension_header, or null when this host lacks it. Check the header's version.
  const void* extension(const char* id) const;

  ModelView(const ModelView&) = delete;
  ModelView& operator=(const ModelView&) = delete;

 protected:
  ModelView() = default;
  ~ModelView() = default;
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
