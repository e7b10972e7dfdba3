// One label per text: the encoder's hidden states over the text (prompt tokens a method
// prepended left out) pooled — [task] pooling "mean" over real tokens, or "cls", the first
// token — then the linear head. Loss: cross-entropy; metrics: accuracy and loss per example.
#pragma once

#include "tasks/classification.h"

namespace tessera {

class SequenceClassification final : public ClassificationTask {
 public:
  SequenceClassification(const Config& config, Backbone& backbone, const Tokenizer& tokenizer);
  const char* kind() const override { return "sequence-classification"; }
  TaskOutput forward(const Batch& b) override;
  std::vector<Metric> metrics(const EvalResult& r) const override;

 private:
  void label(Batch& b, Split split, const std::vector<std::size_t>& rows) const override;
  void accumulate(const Batch& b, Split split, const std::vector<std::size_t>& rows, EvalResult& sums) override;
  void finish(EvalResult& r, Split split) const override;
};

}  // namespace tessera
