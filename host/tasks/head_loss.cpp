#include "tasks/head_loss.h"

#include <tessera/dense_linear.h>
#include <tessera/internal/sites_impl.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>

namespace tessera {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Rows per chunk: about 8 M logits (32 MB in f32) at a time.
std::int64_t chunk_rows(std::int64_t vocab) { return std::max<std::int64_t>(1, (std::int64_t{1} << 23) / std::max<std::int64_t>(1, vocab)); }

// log softmax over dim 1 of z (n, V), in z's own memory on the CPU (where it was measured
// and tested); elsewhere into a new tensor, as no GPU has yet checked here that its kernel
// may write over its input.
at::Tensor log_softmax_rows(at::Tensor& z) {
  if (z.is_cpu()) return at::_log_softmax_out(z, z, 1, /*half_to_float=*/false);
  return at::_log_softmax(z, 1, /*half_to_float=*/false);
}

struct ChunkedHeadLoss : torch::autograd::Function<ChunkedHeadLoss> {
  // h (N, H), w (V, H), b (V) or (0) for none, t (N) -> Σ loss, f32 scalar. (Autograd's
  // input records need a defined tensor in every slot, hence the empty bias.)
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& t) {
    const at::Tensor b = bias.numel() > 0 ? bias : at::Tensor();
    const bool need_h = h.requires_grad(), need_w = w.requires_grad(), need_b = b.defined() && b.requires_grad();
    const std::int64_t N = h.size(0), V = w.size(0), step = chunk_rows(V);
    const auto acc = at::promote_types(w.scalar_type(), at::kFloat);  // softmax and sums in f32 at least
    at::Tensor total = at::zeros({}, h.options().dtype(acc));
    at::Tensor gh = need_h ? at::empty_like(h) : at::Tensor();                            // (N, H)
    at::Tensor gw = need_w ? at::zeros_like(w, w.options().dtype(acc)) : at::Tensor();  // (V, H)
    at::Tensor gb = need_b ? at::zeros({V}, b.options().dtype(acc)) : at::Tensor();     // (V)
    for (std::int64_t s = 0; s < N; s += step) {
      const std::int64_t n = std::min(step, N - s);
      const at::Tensor hc = h.narrow(0, s, n), tc = t.narrow(0, s, n).unsqueeze(1);  // (n, H), (n, 1)
      at::Tensor z = dense_linear(hc, w, b).to(acc);  // (n, V)
      // log softmax in the logits' own memory: one fused kernel, where logsumexp makes a
      // shifted copy and a later exp(z − lse) another pass (8 against 16 ms for 170 rows
      // of a 49 152-word head here).
      z = log_softmax_rows(z);
      total.sub_(z.gather(1, tc).sum());
      if (!(need_h || need_w || need_b)) continue;
      at::Tensor g = z.exp_();                                     // softmax, in place
      g.scatter_add_(1, tc, at::full({n, 1}, -1.0, g.options()));  // − onehot(target)
      if (need_b) gb.add_(g.sum(0));
      if (need_w) gw.add_(g.t().mm(hc.to(acc)));
      if (need_h) gh.narrow(0, s, n).copy_(g.to(w.scalar_type()).mm(w));
    }
    ctx->save_for_backward({gh, gw.defined() ? gw.to(w.scalar_type()) : gw, gb.defined() ? gb.to(b.scalar_type()) : gb});
    return total;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& go = grad_out[0];  // scalar
    auto scaled = [&](const at::Tensor& g) { return g.defined() ? g * go.to(g.scalar_type()) : at::Tensor(); };
    return {scaled(saved[0]), scaled(saved[1]), scaled(saved[2]), at::Tensor()};
  }
};

}  // namespace

std::pair<at::Tensor, at::Tensor> labelled_rows(const at::Tensor& hidden, const at::Tensor& targets) {
  const at::Tensor flat_t = targets.reshape({-1});
  const at::Tensor rows = flat_t.ne(-100).nonzero().squeeze(1);  // (N)
  return {hidden.reshape({-1, hidden.size(-1)}).index_select(0, rows), flat_t.index_select(0, rows)};
}

at::Tensor head_loss_sum(LinearSiteImpl& head, const at::Tensor& hidden, const at::Tensor& targets) {
  if (head.has_interventions())
    return at::cross_entropy_loss(head.forward(hidden).to(at::promote_types(hidden.scalar_type(), at::kFloat)), targets, {}, at::Reduction::Sum);
  const at::Tensor b = head.bias() ? head.bias()->value() : at::empty({0}, hidden.options());
  return ChunkedHeadLoss::apply(hidden, head.weight().value(), b, targets);
}

HeadStats head_stats(LinearSiteImpl& head, const at::Tensor& hidden, const at::Tensor& targets) {
  at::NoGradGuard no_grad;
  const auto acc = at::promote_types(hidden.scalar_type(), at::kFloat);
  at::Tensor loss = at::zeros({}, hidden.options().dtype(acc)), hits = at::zeros({}, targets.options());
  const std::int64_t step = chunk_rows(head.out_features());
  for (std::int64_t s = 0; s < hidden.size(0); s += step) {
    const std::int64_t n = std::min(step, hidden.size(0) - s);
    at::Tensor z = head.forward(hidden.narrow(0, s, n)).to(acc);  // (n, V)
    const at::Tensor t = targets.narrow(0, s, n);                   // (n)
    hits.add_(z.argmax(1).eq(t).sum());  // on the logits, before rounding in log softmax could tie two
    z = log_softmax_rows(z);
    loss.sub_(z.gather(1, t.unsqueeze(1)).sum());
  }
  return {loss.item<double>(), hits.item<std::int64_t>()};
}

}  // namespace tessera
