#include "model/attention.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

namespace tessera {

Tensor attend(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& keep, double dropout, bool training,
              const AttentionSite& site, const Tensor& bias, std::optional<double> scale) {
  const double p = training ? dropout : 0.0;
  // A float mask carries both the bias and the masked keys; a bool mask suffices otherwise.
  Tensor mask = keep;
  if (bias.defined() || site.has_score_hooks()) {
    Tensor b = bias.defined() ? bias.to(q.scalar_type()) : at::zeros({1}, q.options());
    mask = b.expand(at::infer_size(b.sizes(), keep.sizes())).masked_fill(keep.logical_not(), std::numeric_limits<float>::lowest());
  }
  if (!site.has_score_hooks()) return at::scaled_dot_product_attention(q, k, v, mask, p, false, scale);
  const double s = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  Tensor scores = at::matmul(q, k.transpose(-1, -2)) * s + mask;  // (B, nh, T, S)
  scores = site.hook_scores(scores);
  return at::matmul(at::dropout(at::softmax(scores, -1), p, training), v);
}

}  // namespace tessera
