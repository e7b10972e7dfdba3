// What a run needs of a base model, whatever its architecture: its sites (for methods),
// its special token ids, the hidden states of an input, and — for decoders and
// encoder-decoders — the language-model head, the states that feed it, and generation.
// Tasks and `tessera generate` see only this; `load_backbone` is the one place that
// chooses an architecture from config.json's model_type.
#pragma once

#include "architectures/generate.h"
#include "architectures/site_model.h"

#include <c10/core/TensorOptions.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tessera {

enum class BackboneKind { Encoder, Decoder, EncoderDecoder };
const char* to_string(BackboneKind kind);  // "an encoder", "a decoder-only model", "an encoder-decoder"

struct SpecialIds {
  std::int64_t pad = -1;            // config.json's pad_token_id; -1 when it has none
  std::int64_t bos = -1;            // decoders: what generation starts from without a prompt
  std::int64_t decoder_start = -1;  // encoder-decoders: the first decoder input
  std::vector<std::int64_t> eos;    // decoders and encoder-decoders: what ends a text
};

class Backbone {
 public:
  virtual ~Backbone() = default;
  virtual BackboneKind kind() const = 0;
  virtual SiteModel& sites() = 0;
  const SiteModel& sites() const { return const_cast<Backbone*>(this)->sites(); }
  virtual const SpecialIds& special_ids() const = 0;
  // The longest input a learned position table serves; 0 = no such limit.
  virtual std::int64_t max_tokens() const = 0;
  // The input's hidden states after the last layer, over [prompt tokens a method
  // prepended ; ids]: the encoder's (BERT, T5's encoder) or the decoder stack's.
  virtual Encoded encode(const Tensor& ids, const Tensor& mask) const = 0;  // ids, mask (B, T)

  // Language modelling; an encoder refuses these (a task checks kind() first).
  // The states the LM head reads at each target position, prompts dropped: a decoder's
  // text positions (B, T, H), where position t predicts token t + 1; an
  // encoder-decoder's decoder positions (B, U, H) for inputs decoder_ids (B, U).
  virtual Tensor lm_states(const Tensor& ids, const Tensor& mask, const Tensor& decoder_ids) const;
  virtual LinearSiteImpl& lm_head() const;
  // New tokens per prompt (decoder) or per source (encoder-decoder); eos and pad ids come
  // from the model's config.
  virtual std::vector<std::vector<std::int64_t>> generate(const std::vector<std::vector<std::int64_t>>& prompts,
                                                          GenerateOptions options) const;
};

// Reads dir/config.json's model_type: bert or roberta (an encoder), t5 (an
// encoder-decoder), anything else a decoder (which refuses, naming it, a type it does not
// know). Weights converted to `options`. `dir` may also name a LLaMA GGUF file (….gguf):
// its metadata is the config and its tensors are dequantized as they are taken (with
// stream_blocks, its quantized layer weights are kept as the file's blocks instead).
// (How its weights are stored is the next stage, before methods attach: MethodStack.)
// stream_blocks: a GGUF file's quantized layer weights load as its blocks (DecoderModel::load's
// keep_file_blocks), for a caller whose storage stage (store_weights) runs before any forward pass.
std::unique_ptr<Backbone> load_backbone(const std::string& dir, c10::TensorOptions options, bool stream_blocks = false);

}  // namespace tessera
