#include "tasks/distillation.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <stdexcept>

namespace tessera {

Distillation::Distillation(const Config& config, Backbone& backbone, const Tokenizer& tokenizer)
    : Task(config, backbone, tokenizer, Labels::None) {
  const auto max_length = config.data.max_length;
  tokenize_with([&](const Example& e, Split) { return tokenizer.encode(e.text, max_length); });
}

Tensor Distillation::student(const Batch& b) {
  enter(b);
  Encoded e = backbone_.encode(b.ids, b.mask);
  return e.hidden.narrow(1, e.prompt_length, b.ids.size(1));  // prompt tokens a method prepended left out
}

Tensor Distillation::teacher(const Batch& b) {
  if (!base_only_) throw std::logic_error("the distillation task runs only once the methods are attached");
  at::NoGradGuard no_grad;
  SiteModel& model = backbone_.sites();
  const bool was_training = model.training();
  model.train(false);  // the base's function itself: no dropout in the targets
  Tensor h;
  try {
    base_only_([&] { h = backbone_.encode(b.ids, b.mask).hidden; });
  } catch (...) {
    model.train(was_training);
    throw;
  }
  model.train(was_training);
  return h;
}

TaskOutput Distillation::forward(const Batch& b) {
  Tensor target = teacher(b), h = student(b);         // (B, T, H) each
  Tensor m = b.mask.unsqueeze(-1).to(at::kFloat);     // (B, T, 1)
  // In f32 as every task's loss: a bf16 sum of thousands of tokens would round.
  Tensor squared = (h.to(at::kFloat) - target.to(at::kFloat)).pow(2) * m;  // padding counts nothing
  return {squared.sum() / (m.sum() * h.size(-1)).clamp_min(1), {}};
}

void Distillation::accumulate(const Batch& b, Split, const std::vector<std::size_t>&, EvalResult& sums) {
  Tensor target = teacher(b), h = student(b);
  const std::int64_t H = h.size(-1);
  Tensor real = b.mask.reshape({-1}).nonzero().squeeze(1);  // (N): the real tokens' rows
  Tensor s = h.to(at::kFloat).reshape({-1, H}).index_select(0, real), t = target.to(at::kFloat).reshape({-1, H}).index_select(0, real);  // (N, H)
  sums.loss += (s - t).pow(2).mean(-1).sum().item<double>();
  sums.accuracy += at::cosine_similarity(s, t, -1).sum().item<double>();
  sums.tokens += s.size(0);
}

void Distillation::finish(EvalResult& r, Split) const {
  const auto n = static_cast<double>(std::max<std::int64_t>(r.tokens, 1));
  r.accuracy /= n, r.loss /= n;
}

std::vector<Metric> Distillation::metrics(const EvalResult& r) const {
  return {{"cosine", "cosine to the base", r.accuracy},
          {"loss", "test loss (mean squared difference per unit)", r.loss},
          {"tokens", "test tokens", static_cast<double>(r.tokens), true}};
}

}  // namespace tessera
