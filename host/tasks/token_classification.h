// One label per word (named entities, parts of speech): the text arrives as words with a
// tag each; each word is tokenized on its own and its tag goes on its first piece (-100
// on the others and on special tokens), as transformers' examples align them. The linear
// head reads every token; loss and accuracy count the labelled pieces, one per word.
#pragma once

#include "tasks/classification.h"

namespace tessera {

class TokenClassification final : public ClassificationTask {
 public:
  TokenClassification(const Config& config, Backbone& backbone, const Tokenizer& tokenizer);
  const char* kind() const override { return "token-classification"; }
  TaskOutput forward(const Batch& b) override;
  std::vector<Metric> metrics(const EvalResult& r) const override;
  std::int64_t loss_units(const Batch& b) const override;  // the tagged pieces (lm_labels not -100)

 private:
  std::vector<std::int64_t> encode(const Example& e, Split split);
  void label(Batch& b, Split split, const std::vector<std::size_t>& rows) const override;
  void accumulate(const Batch& b, Split split, const std::vector<std::size_t>& rows, EvalResult& sums) override;
  void finish(EvalResult& r, Split split) const override;
  std::vector<std::int64_t> before_, after_;          // the template's special tokens around the pieces
  std::vector<std::vector<std::int64_t>> tags_[2];  // per split, per example, per token
};

}  // namespace tessera
