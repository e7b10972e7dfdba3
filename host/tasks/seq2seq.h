// Sequence to sequence with an encoder-decoder: the text column is the source, the
// target column what the decoder learns to write, teacher-forced (it reads the target
// shifted right by one, after decoder_start_token_id). Metrics: the language-model ones
// over the target, and the corpus BLEU of greedy outputs.
#pragma once

#include "tasks/language_model.h"

#include <string>

namespace tessera {

class Seq2Seq final : public LanguageModelTask {
 public:
  Seq2Seq(const Config& config, Backbone& backbone, const Tokenizer& tokenizer);
  const char* kind() const override { return "seq2seq"; }
  bool sums_add() const override { return false; }  // BLEU over every sentence: not split across ranks
  std::vector<Metric> metrics(const EvalResult& r) const override;
  // Greedy outputs for examples order[begin, end) of a split, as text.
  std::vector<std::string> generate_text(Split split, const std::vector<std::size_t>& order, std::size_t begin, std::size_t end);

 private:
  void label(Batch& b, Split split, const std::vector<std::size_t>& rows) const override;
  std::pair<Tensor, Tensor> head_rows(const Batch& b) const override;
  void start(Split) override { hypotheses_.clear(); }
  void accumulate(const Batch& b, Split split, const std::vector<std::size_t>& rows, EvalResult& sums) override;
  void finish(EvalResult& r, Split split) const override;
  std::vector<std::vector<std::int64_t>> targets_[2];
  std::vector<std::string> hypotheses_;  // of the evaluation under way
};

}  // namespace tessera
