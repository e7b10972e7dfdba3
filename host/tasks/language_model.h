// What the two text-generating tasks share: the model's own (frozen) LM head, a loss
// over the tokens the labels mark (cross-entropy per predicted token, computed in chunks
// without the full logits: tasks/head_loss.h), and per-token metrics — next-token
// accuracy, mean loss and its exponential, the perplexity.
#pragma once

#include "tasks/task.h"

#include <utility>

namespace tessera {

class LanguageModelTask : public Task {
 public:
  TaskOutput forward(const Batch& b) override;
  std::vector<Metric> metrics(const EvalResult& r) const override;
  // The labelled tokens the loss averages over: lm_labels that are not -100.
  std::int64_t loss_units(const Batch& b) const override;

 protected:
  using Task::Task;
  // The LM head's input rows that predict a labelled token, and those tokens: (N, H), (N).
  // Unlabelled positions (padding, prompts) never reach the head.
  virtual std::pair<Tensor, Tensor> head_rows(const Batch& b) const = 0;
  void accumulate(const Batch& b, Split split, const std::vector<std::size_t>& rows, EvalResult& sums) override;
  void finish(EvalResult& r, Split split) const override;
};

}  // namespace tessera
