// Everything one run works on: the base model, its tokenizer, the data, the attached
// method instances and the task head. `tessera train` and `tessera eval` both build one
// from a config, so evaluation sees exactly what training saw.
//
// Tasks: sequence-classification (an encoder, pooled, a linear head), token-
// classification (an encoder, a linear head per token; each word labelled on its first
// piece, as transformers' examples align them), causal-lm (a
// decoder and its own LM head; next-token loss over the text, prompt tokens left out) and
// seq2seq (an encoder-decoder; loss over the target, BLEU of greedy outputs).
#pragma once

#include "model/bert.h"
#include "model/decoder.h"
#include "model/t5.h"
#include "model/tokenizer.h"
#include "runtime/config.h"
#include "runtime/plugin_registry.h"
#include "train/dataset.h"

#include <tessera/extensions.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace tessera {

enum class Split { Train, Test };

struct Batch {
  Tensor ids;        // (B, T) int64, padded on the right
  Tensor mask;       // (B, T) int64, 1 = token
  Tensor labels;     // (B) int64: classification
  Tensor lm_labels;  // token-classification (B, T): the word's tag on its first piece, else -100;
                     // causal-lm (B, T): the ids with -100 on padding and prompt tokens;
                     // seq2seq (B, U): the target ids with -100 on padding
  Tensor decoder_ids;  // seq2seq (B, U): [decoder start ; target[:-1]]
  std::map<std::string, std::vector<std::string>> tags;  // [data] tag_columns: column -> (B) values
};

// Next-token statistics of a causal-lm batch.
struct TokenStats {
  double loss_sum = 0;  // summed cross-entropy over labelled next tokens
  std::int64_t tokens = 0, correct = 0;
};

class Session {
 public:
  // `config` must have passed check_methods against `registry`.
  Session(Config config, const PluginRegistry& registry);
  ~Session();  // detaches every method before the model goes

  const Config& config() const { return config_; }
  bool causal() const { return config_.task.kind == "causal-lm"; }
  bool seq2seq() const { return config_.task.kind == "seq2seq"; }
  bool token_classification() const { return config_.task.kind == "token-classification"; }
  SiteModel& model() { return const_cast<SiteModel&>(static_cast<const Session*>(this)->model()); }
  const SiteModel& model() const {
    if (encoder_) return *encoder_;
    if (decoder_) return *decoder_;
    return *t5_;
  }
  BertModel* encoder() { return encoder_.get(); }
  const Dataset& data() const { return data_; }
  std::vector<std::unique_ptr<MethodInstance>>& methods() { return methods_; }

  // Examples order[begin, end) of a split, padded as [data] padding says.
  Batch batch(Split split, const std::vector<std::size_t>& order, std::size_t begin, std::size_t end) const;
  const std::vector<Example>& examples(Split split) const { return split == Split::Train ? data_.train : data_.test; }
  // Token ids of every example, special tokens included (tokenized once); causal-lm:
  // prompt, text and EOS, with prompt_length(split)[i] prompt tokens in front.
  const std::vector<std::vector<std::int64_t>>& token_ids(Split split) const { return split == Split::Train ? train_ids_ : test_ids_; }
  const std::vector<std::vector<std::int64_t>>& split_targets(Split split) const { return split == Split::Train ? train_target_ : test_target_; }
  const std::vector<std::int64_t>& prompt_lengths(Split split) const { return split == Split::Train ? train_prompt_ : test_prompt_; }
  Tensor logits(const Batch& b);  // sequence classification: (B, L); token classification: (B, T, L)
  Tensor loss(const Batch& b);    // the task's training loss (scalar f32)
  // The training step's batch, for methods that run the forward pass again from extra_loss()
  // (tessera.host.training); null outside it.
  void set_training_batch(const Batch* b) { training_batch_ = b; }
  // Whether a method said its trainable tensors changed since the last call.
  bool take_trainable_changed() { return std::exchange(trainable_changed_, false); }
  TokenStats token_stats(const Batch& b);  // token-classification, causal-lm and seq2seq
  // seq2seq: greedy outputs for examples order[begin, end) of a split, as text.
  std::vector<std::string> generate_text(Split split, const std::vector<std::size_t>& order, std::size_t begin, std::size_t end);

  // The classification head; empty for causal-lm (the decoder's own head is frozen).
  NamedTensors head() const {
    if (!head_w_.defined()) return {};
    return {{"classifier.weight", head_w_}, {"classifier.bias", head_b_}};
  }
  std::int64_t base_parameter_count();
  std::int64_t trainable_parameter_count();

  // The adapter directory: tessera.json, head.safetensors, and per method instance
  // <name>/adapter_config.json + <name>/adapter_model.safetensors (HF PEFT layout).
  void save_adapter(const std::string& dir);
  // Refuses, naming tessera.json, an adapter trained for another task, architecture,
  // label set or list of methods.
  void load_adapter(const std::string& dir);

 private:
  void check_manifest(const std::string& dir);
  // What methods may read of the batch a forward pass is about to run (ModelView::sample_tags).
  void enter(const Batch& b) const { model().set_sample_tags(b.tags); }
  Tensor classification_loss(const Tensor& logits, const Batch& b) const;  // (B, L) or (B, T, L)
  // The host extensions methods may ask the model for (tessera/extensions.h).
  void offer_extensions();
  Config config_;
  std::unique_ptr<BertModel> encoder_;
  std::unique_ptr<DecoderModel> decoder_;
  std::unique_ptr<T5Model> t5_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::int64_t pad_id_ = 0;
  Dataset data_;
  std::vector<std::vector<std::int64_t>> train_ids_, test_ids_;
  std::vector<std::int64_t> train_prompt_, test_prompt_;
  std::vector<std::vector<std::int64_t>> train_target_, test_target_;  // seq2seq
  std::vector<std::vector<std::int64_t>> train_tags_, test_tags_;      // token-classification, per token
  std::vector<std::unique_ptr<MethodInstance>> methods_;
  std::vector<PluginInfo> plugins_;  // each method's plugin as found, for the adapter's manifest
  Tensor head_w_;  // (L, H)
  Tensor head_b_;  // (L)
  const Batch* training_batch_ = nullptr;
  bool trainable_changed_ = false;
  tessera_host_training_v1 training_ext_{};
  tessera_host_tokenizer_v1 tokenizer_ext_{};
};

c10::TensorOptions options_for(const ModelConfig& m);

}  // namespace tessera
