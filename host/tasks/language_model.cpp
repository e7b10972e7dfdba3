#include "tasks/language_model.h"

#include "tasks/head_loss.h"

#include <ATen/ATen.h>

#include <cmath>

namespace tessera {

TaskOutput LanguageModelTask::forward(const Batch& b) {
  enter(b);
  auto [h, next] = head_rows(b);
  return {head_loss_sum(backbone_.lm_head(), h, next) / static_cast<double>(std::max<std::int64_t>(1, next.size(0))), Tensor()};
}

std::int64_t LanguageModelTask::loss_units(const Batch& b) const { return b.lm_labels.ne(-100).sum().item<std::int64_t>(); }

void LanguageModelTask::accumulate(const Batch& b, Split, const std::vector<std::size_t>&, EvalResult& sums) {
  enter(b);
  auto [h, next] = head_rows(b);
  const HeadStats s = head_stats(backbone_.lm_head(), h, next);
  sums.loss += s.loss_sum, sums.accuracy += static_cast<double>(s.correct), sums.tokens += next.size(0);
}

void LanguageModelTask::finish(EvalResult& r, Split) const {
  const auto n = static_cast<double>(std::max<std::int64_t>(r.tokens, 1));
  r.accuracy /= n, r.loss /= n;
  r.perplexity = std::exp(r.loss);
}

std::vector<Metric> LanguageModelTask::metrics(const EvalResult& r) const {
  return {{"perplexity", "test perplexity", r.perplexity}, {"accuracy", "next-token accuracy", r.accuracy},
          {"loss", "test loss (per token)", r.loss}, {"tokens", "test tokens", static_cast<double>(r.tokens), true}};
}

}  // namespace tessera
