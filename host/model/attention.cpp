#include "model/attention.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

namespace tessera {

Tensor attend(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& keep, double dropout, bool training,
              const AttentionSite& site) {
  const double p = training ? dropout : 0.0;
  if (!site.has_score_hooks()) return at::scaled_dot_product_attention(q, k, v, keep, p);
  Tensor bias = at::zeros(keep.sizes(), q.options()).masked_fill(keep.logical_not(), std::numeric_limits<float>::lowest());
  Tensor scores = at::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(q.size(-1))) + bias;  // (B, nh, T, S)
  scores = site.hook_scores(scores);
  return at::matmul(at::dropout(at::softmax(scores, -1), p, training), v);
}

}  // namespace tessera
