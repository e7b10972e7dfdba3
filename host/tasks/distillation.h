// Distillation toward the base model: on unlabelled text, the adapted model's last hidden
// states learn the frozen base model's own. The teacher is the same model with every method
// instance switched off, in evaluation mode, without gradients — no second copy of the
// weights. It is the light adaptation phase that methods changing the base's computation
// need before fine-tuning (CoDA's routed layers start far from the dense function) on a
// checkpoint without its pretraining head (a sentence encoder has no masked-LM head).
// Any backbone: the states are encode()'s (the encoder's, T5's encoder's, a decoder stack's).
// Loss: over the real tokens, the mean squared difference per hidden unit. Metrics: the
// mean cosine between the two states per token (EvalResult::accuracy holds it), the loss.
#pragma once

#include "tasks/task.h"

namespace tessera {

class Distillation final : public Task {
 public:
  Distillation(const Config& config, Backbone& backbone, const Tokenizer& tokenizer);
  const char* kind() const override { return "distillation"; }
  TaskOutput forward(const Batch& b) override;
  std::int64_t loss_units(const Batch& b) const override { return b.mask.sum().item<std::int64_t>(); }
  std::vector<Metric> metrics(const EvalResult& r) const override;
  void use_base_only(BaseOnly run) override { base_only_ = std::move(run); }

 private:
  void label(Batch&, Split, const std::vector<std::size_t>&) const override {}  // the base model labels
  void accumulate(const Batch& b, Split split, const std::vector<std::size_t>& rows, EvalResult& sums) override;
  void finish(EvalResult& r, Split split) const override;
  // (B, T, H) over the batch's text tokens: the student's (this model) and the teacher's.
  Tensor student(const Batch& b);
  Tensor teacher(const Batch& b);
  BaseOnly base_only_;
};

}  // namespace tessera
