// Text continuation with a decoder: the prompts run once, then one token per step
// through the key/value cache. Greedy (argmax) or sampled (temperature, then top-k,
// then top-p, in the order transformers applies them).
#pragma once

#include "architectures/decoder.h"
#include "architectures/t5.h"

#include <cstdint>
#include <vector>

namespace tessera {

struct GenerateOptions {
  std::int64_t max_new_tokens = 32;
  bool sample = false;
  double temperature = 1.0;
  std::int64_t top_k = 0;  // 0 = off
  double top_p = 1.0;      // 1 = off
  std::uint64_t seed = 0;
  std::vector<std::int64_t> eos_token_ids;  // a row stops after emitting one of these
  std::int64_t pad_token_id = 0;            // fills prompts on the left and finished rows
};

// Per prompt: its new tokens (the EOS that ended it included). Prompts of different
// lengths are padded on the left.
std::vector<std::vector<std::int64_t>> generate(const DecoderModel& model, const std::vector<std::vector<std::int64_t>>& prompts,
                                                const GenerateOptions& options);

// Encoder-decoder: per source, the target tokens after decoder_start_token_id. Sources of
// different lengths are padded on the right (the encoder's mask hides the padding).
std::vector<std::vector<std::int64_t>> generate(const T5Model& model, const std::vector<std::vector<std::int64_t>>& sources,
                                                const GenerateOptions& options);

}  // namespace tessera
