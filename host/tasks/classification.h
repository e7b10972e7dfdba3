// What the two classification tasks share: a linear head over the encoder's hidden
// states (nn.Linear's init, trained at [train] head_lr), one label set from the data.
#pragma once

#include "tasks/task.h"

namespace tessera {

class ClassificationTask : public Task {
 public:
  NamedTensors head() const override { return {{"classifier.weight", w_}, {"classifier.bias", b_}}; }
  void create_head() override;
  void load_head(const std::string& file) override;

 protected:
  ClassificationTask(const Config& config, Backbone& backbone, const Tokenizer& tokenizer, Labels labels);
  Tensor classify(const Tensor& h) const;  // (…, H) -> (…, L) f32
  Tensor w_;  // (L, H)
  Tensor b_;  // (L)
};

}  // namespace tessera
