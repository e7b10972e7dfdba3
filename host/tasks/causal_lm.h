// Causal language modelling with a decoder: each example is [BOS] prompt text EOS; the
// loss runs over the text and its EOS, the prompt's tokens (a `prompt` column) left out,
// position t predicting token t + 1.
#pragma once

#include "tasks/language_model.h"

namespace tessera {

class CausalLm final : public LanguageModelTask {
 public:
  CausalLm(const Config& config, Backbone& backbone, const Tokenizer& tokenizer);
  const char* kind() const override { return "causal-lm"; }
  // Per example of a split: how many of its tokens are prompt (left out of the loss).
  const std::vector<std::int64_t>& prompt_lengths(Split split) const { return prompt_[split == Split::Train ? 0 : 1]; }

 private:
  std::vector<std::int64_t> encode(const Example& e, Split split);
  void refuse_empty_splits() const;
  void label(Batch& b, Split split, const std::vector<std::size_t>& rows) const override;
  std::pair<Tensor, Tensor> head_rows(const Batch& b) const override;
  std::int64_t loss_units(const Batch& b) const override;  // the labels after the first position: what is predicted
  std::vector<std::int64_t> prompt_[2];
};

}  // namespace tessera
