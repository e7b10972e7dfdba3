// tessera/sample_mean.h: each sample's mean over its real tokens, against a plain loop over
// the samples' rows, in the padded layout and in the unpadded one (rows of real tokens only).
#include "support.h"

#include <tessera/internal/sites_impl.h>
#include <tessera/sample_mean.h>

using namespace tessera;

namespace {

struct View final : ModelViewImpl {};

// The loop: sample b's mean of s[b, t] over the t its mask keeps.
Tensor loop_means(const Tensor& s, const Tensor& mask) {  // s: (B, T, k), mask: (B, T)
  std::vector<Tensor> out;
  for (std::int64_t b = 0; b < s.size(0); ++b) {
    Tensor sum = at::zeros({s.size(2)}, s.options());
    std::int64_t n = 0;
    for (std::int64_t t = 0; t < s.size(1); ++t)
      if (mask[b][t].item<std::int64_t>() == 1) sum = sum + s[b][t], ++n;
    out.push_back(sum / static_cast<double>(n));
  }
  return at::stack(out);  // (B, k)
}

}  // namespace

CATCH_TEST_CASE("mean_over_tokens: each sample's mean over its real tokens, padded or unpadded, pads never counted", "[sdk][sample_mean]") {
  at::manual_seed(3);
  const std::int64_t B = 3, T = 5, k = 2;
  const Tensor s = at::randn({B, T, k}, at::kDouble);
  Tensor mask = at::ones({B, T}, at::kLong);
  mask.index_put_({1, at::indexing::Slice(2)}, 0);
  mask.index_put_({2, at::indexing::Slice(4)}, 0);
  const Tensor want = loop_means(s, mask);
  View view;
  view.set_attention_mask(mask);
  // Padded: whatever the pads hold.
  const Tensor noisy = s + (1 - mask).unsqueeze(-1).to(at::kDouble) * 100;
  CATCH_CHECK(at::allclose(mean_over_tokens(view, noisy), want, 0, 1e-12));
  CATCH_CHECK(mean_over_tokens_per_row(view, noisy).sizes() == std::vector<std::int64_t>{B, 1, k});
  // Unpadded: the real tokens' rows, as the host hands them to token-wise closures.
  const Tensor rows = mask.reshape({-1}).nonzero().reshape({-1});  // flat positions in (B, T)
  view.set_token_rows(rows, T);
  const Tensor real = s.reshape({B * T, k}).index_select(0, rows);  // (N, k)
  CATCH_CHECK(at::allclose(mean_over_tokens(view, real), want, 0, 1e-12));
  const Tensor per_row = mean_over_tokens_per_row(view, real);  // (N, k): each row its sample's mean
  CATCH_CHECK(at::allclose(per_row, want.index_select(0, rows.div(T, "floor")), 0, 1e-12));
  // A padded tensor the mask does not describe (another sequence: T5's cross-attention reads
  // the encoder's states): every position counts.
  view.set_token_rows(Tensor(), 0);
  const Tensor other = at::randn({B, T + 2, k}, at::kDouble);
  CATCH_CHECK(at::allclose(mean_over_tokens(view, other), other.mean(1), 0, 1e-12));
  CATCH_CHECK_THROWS_WITH(mean_over_tokens(view, at::randn({B * T}, at::kDouble)), Catch::Contains("neither (B, T, k) nor one row per real token"));
}

CATCH_TEST_CASE("mean_over_tokens: bf16 gates of a long sample average in float32, and each row's gradient is its sample's 1/n", "[sdk][sample_mean]") {
  // 700 gates near ½ in bf16: summed in bf16 the total would stop growing at 256.
  View view;
  const std::int64_t T = 700;
  Tensor mask = at::ones({2, T}, at::kLong);
  mask.index_put_({1, at::indexing::Slice(100)}, 0);
  view.set_attention_mask(mask);
  const Tensor rows = mask.reshape({-1}).nonzero().reshape({-1});
  view.set_token_rows(rows, T);
  at::manual_seed(5);
  const Tensor gates = (0.5 + 0.01 * at::randn({rows.size(0), 1}, at::kDouble));
  const Tensor want = loop_means(gates.new_zeros({2, T, 1}).reshape({2 * T, 1}).index_copy(0, rows, gates).reshape({2, T, 1}), mask);
  const Tensor got = mean_over_tokens(view, gates.to(at::kBFloat16));
  CATCH_CHECK(got.scalar_type() == at::kBFloat16);
  CATCH_CHECK(at::allclose(got.to(at::kDouble), want, 0, 4e-3));  // bf16's rounding of ½, not a lost half
  const Tensor x = gates.clone().set_requires_grad(true);
  mean_over_tokens(view, x).sum().backward();
  const Tensor n = mask.sum(1).to(at::kDouble).index_select(0, rows.div(T, "floor")).unsqueeze(1);  // each row's sample's count
  CATCH_CHECK(at::allclose(x.grad(), 1.0 / n, 0, 1e-12));
}
