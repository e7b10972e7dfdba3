#include "tasks/sequence_classification.h"

#include <ATen/ATen.h>

namespace tessera {

SequenceClassification::SequenceClassification(const Config& config, Backbone& backbone, const Tokenizer& tokenizer)
    : ClassificationTask(config, backbone, tokenizer, Labels::PerExample) {
  const auto max_length = config.data.max_length;
  tokenize_with([&](const Example& e, Split) { return tokenizer.encode(e.text, max_length); });
}

void SequenceClassification::label(Batch& b, Split split, const std::vector<std::size_t>& rows) const {
  b.labels = at::empty({static_cast<std::int64_t>(rows.size())}, at::kLong);
  auto a = b.labels.accessor<std::int64_t, 1>();
  for (std::size_t r = 0; r < rows.size(); ++r) a[static_cast<std::int64_t>(r)] = examples(split)[rows[r]].label;
}

TaskOutput SequenceClassification::forward(const Batch& b) {
  enter(b);
  Encoded e = backbone_.encode(b.ids, b.mask);
  Tensor h = e.hidden.narrow(1, e.prompt_length, b.ids.size(1));  // (B, T, H): the text's tokens only
  Tensor pooled;                                                   // (B, H)
  if (config_.task.pooling == "cls") {
    pooled = h.select(1, 0);
  } else {
    Tensor m = b.mask.unsqueeze(-1).to(h.dtype());  // (B, T, 1)
    pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9);
  }
  Tensor logits = classify(pooled);  // (B, L) f32
  return {at::cross_entropy_loss(logits, b.labels), logits};
}

void SequenceClassification::accumulate(const Batch& b, Split, const std::vector<std::size_t>&, EvalResult& sums) {
  Tensor logits = forward(b).logits.to(at::kFloat);  // (B, L)
  sums.loss += at::cross_entropy_loss(logits, b.labels, {}, at::Reduction::Sum).item<double>();
  sums.accuracy += static_cast<double>(logits.argmax(-1).eq(b.labels).sum().item<std::int64_t>());
}

void SequenceClassification::finish(EvalResult& r, Split) const {
  const auto n = static_cast<double>(r.examples);
  r.accuracy /= n, r.loss /= n;
}

std::vector<Metric> SequenceClassification::metrics(const EvalResult& r) const {
  return {{"accuracy", "test accuracy", r.accuracy}, {"loss", "test loss", r.loss}};
}

}  // namespace tessera
