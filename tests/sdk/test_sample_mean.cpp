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
