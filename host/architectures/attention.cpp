#include "architectures/attention.h"

#include <tessera/dropout.h>

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

namespace tessera {

namespace {

// The most negative finite value of a compute dtype: a masked score (float's lowest does
// not fit in bf16 or f16, which refuse the fill).
double lowest(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return static_cast<float>(std::numeric_limits<c10::BFloat16>::lowest());
    case at::kHalf: return static_cast<float>(std::numeric_limits<c10::Half>::lowest());
    case at::kDouble: return std::numeric_limits<double>::lowest();
    default: return std::numeric_limits<float>::lowest();
  }
}

}  // namespace

void prepend_prefixes(Tensor& k, Tensor& v, std::initializer_list<const KVPair*> prefixes) {
  std::vector<Tensor> ks, vs;
  for (const KVPair* p : prefixes)
    if (p->first.defined()) ks.push_back(p->first.to(k.dtype())), vs.push_back(p->second.to(v.dtype()));
  if (ks.empty()) return;
  ks.push_back(k), vs.push_back(v);
  k = at::cat(ks, 2), v = at::cat(vs, 2);
}

Tensor attend(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& keep, double dropout, bool training,
              const AttentionSiteImpl& site, const Tensor& bias, std::optional<double> scale, bool causal) {
  const double p = training ? dropout : 0.0;
  // The plain path: score hooks must see the scores; and on the CPU, torch's fused kernels
  // have no dropout (with p > 0 it runs this same path itself, with torch's dropout).
  const bool plain = site.has_score_hooks() || (p > 0 && q.device().is_cpu());
  if (!keep.defined() && !bias.defined() && !plain) return at::scaled_dot_product_attention(q, k, v, {}, p, causal, scale);
  if (!keep.defined()) {  // spell the implicit mask out for the paths below
    const auto T = q.size(2), S = k.size(2);
    Tensor all = at::ones({1, 1, T, S}, q.options().dtype(at::kBool));
    return attend(q, k, v, causal ? all.tril(S - T) : all, dropout, training, site, bias, scale, false);
  }
  // A float mask carries both the bias and the masked keys; a bool mask suffices otherwise.
  Tensor mask = keep;
  if (bias.defined() || plain) {
    Tensor b = bias.defined() ? bias.to(q.scalar_type()) : at::zeros({1}, q.options());
    mask = b.expand(at::infer_size(b.sizes(), keep.sizes())).masked_fill(keep.logical_not(), lowest(q.scalar_type()));
  }
  if (!plain) return at::scaled_dot_product_attention(q, k, v, mask, p, false, scale);
  const double s = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  Tensor scores = at::matmul(q, k.transpose(-1, -2)) * s + mask;  // (B, nh, T, S)
  scores = site.hook_scores(scores);
  return at::matmul(tessera::dropout(at::softmax(scores, -1), p, training), v);
}

}  // namespace tessera
