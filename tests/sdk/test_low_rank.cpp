// tessera::low_rank: y = s · (x Aᵀ) Bᵀ and its three gradients against float64 autograd of
// the formula, with and without x's gradient, in bf16 with float32 masters, and outside
// autograd; low_rank_group against the same formula per update, through its masks.
#include "support.h"

#include <tessera/dropout.h>
#include <tessera/low_rank.h>

#include <torch/csrc/autograd/autograd.h>

#include <limits>

using namespace tessera;
using tessera::test::max_abs_diff;

namespace {

struct Grads {
  Tensor y, x, A, B;
};

// y and the gradients of Σ y ∘ g, in float64 through autograd's own products.
Grads reference(const Tensor& x, const Tensor& A, const Tensor& B, double s, const Tensor& g) {
  Tensor x64 = x.detach().to(at::kDouble).requires_grad_(true), A64 = A.detach().to(at::kDouble).requires_grad_(true),
         B64 = B.detach().to(at::kDouble).requires_grad_(true);
  Tensor y = at::matmul(at::matmul(x64, A64.t()), B64.t()) * s;
  torch::autograd::backward({y}, {g.to(at::kDouble)});
  return {y.detach(), x64.grad(), A64.grad(), B64.grad()};
}

double scale(const Tensor& t) { return t.abs().max().item<double>(); }

// How far float32 may land from each of them (tests/support.h): a product of three factors
// with inner lengths m and n, in either order, stays within γ_{m+n} of the product of their
// magnitudes; the scale s is one more rounding.
Grads bounds(const Tensor& x, const Tensor& A, const Tensor& B, double s, const Tensor& g) {
  const Tensor ax = x.detach().abs().to(at::kDouble).reshape({-1, x.size(-1)}), aA = A.detach().abs().to(at::kDouble),
               aB = B.detach().abs().to(at::kDouble), ag = g.abs().to(at::kDouble).reshape({-1, g.size(-1)});
  const std::int64_t rows = ax.size(0), in = A.size(1), r = A.size(0), out = B.size(0);
  const Tensor y = test::gamma(in + r + 1) * s * at::matmul(at::matmul(ax, aA.t()), aB.t());      // (N, out)
  const Tensor dx = test::gamma(out + r + 1) * s * at::matmul(at::matmul(ag, aB), aA);             // (N, in)
  const Tensor dA = test::gamma(out + rows + 1) * s * at::matmul(at::matmul(ag, aB).t(), ax);      // (r, in)
  const Tensor dB = test::gamma(in + rows + 1) * s * at::matmul(ag.t(), at::matmul(ax, aA.t()));   // (out, r)
  return {y.reshape(g.sizes()), dx.reshape(x.sizes()), dA, dB};
}

}  // namespace

CATCH_TEST_CASE("low_rank: value and the gradients of x, A and B equal autograd's of s (x Aᵀ) Bᵀ", "[sdk][low_rank]") {
  at::manual_seed(3);
  const auto f32 = test::options();
  const std::int64_t in = 48, out = 80, r = 4;
  const double s = 2.5;
  for (bool x_grad : {true, false}) {
    CATCH_INFO("x needs its gradient: " << x_grad);
    Tensor x = at::randn({3, 7, in}, f32).requires_grad_(x_grad);  // (B, T, in): the rows of a batch
    Tensor A = (at::randn({r, in}, f32) * 0.2).requires_grad_(true), B = (at::randn({out, r}, f32) * 0.2).requires_grad_(true);
    Tensor g = at::randn({3, 7, out}, f32);
    Tensor y = low_rank(x, A, B, s);
    torch::autograd::backward({y}, {g});
    const Grads ref = reference(x, A, B, s, g), bound = bounds(x, A, B, s, g);
    CATCH_CHECK(y.sizes() == ref.y.sizes());
    CATCH_CHECK(test::bound_ratio(y, ref.y, bound.y) <= 1);
    CATCH_CHECK(test::bound_ratio(A.grad(), ref.A, bound.A) <= 1);
    CATCH_CHECK(test::bound_ratio(B.grad(), ref.B, bound.B) <= 1);
    if (x_grad) CATCH_CHECK(test::bound_ratio(x.grad(), ref.x, bound.x) <= 1);
    else CATCH_CHECK_FALSE(x.grad().defined());
    // Outside autograd: the same values, no graph.
    at::NoGradGuard no_grad;
    Tensor plain = low_rank(x, A, B, s);
    CATCH_CHECK_FALSE(plain.requires_grad());
    CATCH_CHECK(test::bound_ratio(plain, ref.y, bound.y) <= 1);
  }
}

CATCH_TEST_CASE("low_rank with rows: value and the gradients of x, A, B and the rows equal autograd's of s ((x Aᵀ) ∘ rows) Bᵀ (SDK 2.8)", "[sdk][low_rank]") {
  at::manual_seed(5);
  const auto f32 = test::options();
  const std::int64_t in = 48, out = 80, r = 4;
  const double s = 1.5;
  // (B, T, in) with one weight per sample (a gate), per token, and (N, in) rows with (N, 1).
  const std::vector<std::pair<std::vector<std::int64_t>, std::vector<std::int64_t>>> shapes{
      {{3, 7, in}, {3, 1, 1}}, {{3, 7, in}, {3, 7, 1}}, {{11, in}, {11, 1}}};
  for (const auto& [xs, rs] : shapes) {
    CATCH_INFO("x " << c10::str(at::IntArrayRef(xs)) << ", rows " << c10::str(at::IntArrayRef(rs)));
    Tensor x = at::randn(xs, f32).requires_grad_(true);
    Tensor A = (at::randn({r, in}, f32) * 0.2).requires_grad_(true), B = (at::randn({out, r}, f32) * 0.2).requires_grad_(true);
    Tensor rows = at::rand(rs, f32).requires_grad_(true);
    auto gshape = xs;
    gshape.back() = out;
    const Tensor g = at::randn(gshape, f32);
    Tensor y = low_rank(x, A, B, s, rows);
    torch::autograd::backward({y}, {g});
    // The formula in float64 through autograd's own products.
    Tensor x64 = x.detach().to(at::kDouble).requires_grad_(true), A64 = A.detach().to(at::kDouble).requires_grad_(true),
           B64 = B.detach().to(at::kDouble).requires_grad_(true), r64 = rows.detach().to(at::kDouble).requires_grad_(true);
    Tensor y64 = at::matmul(at::matmul(x64, A64.t()) * r64, B64.t()) * s;
    torch::autograd::backward({y64}, {g.to(at::kDouble)});
    auto close = [](const Tensor& a, const Tensor& b) { return max_abs_diff(a.to(at::kDouble), b) <= 1e-5 * std::max(1.0, scale(b)); };
    CATCH_CHECK(y.sizes() == y64.sizes());
    CATCH_CHECK(close(y, y64.detach()));
    CATCH_CHECK(close(x.grad(), x64.grad()));
    CATCH_CHECK(close(A.grad(), A64.grad()));
    CATCH_CHECK(close(B.grad(), B64.grad()));
    CATCH_CHECK(rows.grad().sizes() == rows.sizes());
    CATCH_CHECK(close(rows.grad(), r64.grad()));
    // Outside autograd the same values; undefined rows are low_rank without them.
    at::NoGradGuard no_grad;
    CATCH_CHECK(close(low_rank(x, A, B, s, rows), y64.detach()));
    CATCH_CHECK(max_abs_diff(low_rank(x, A, B, s, Tensor()), low_rank(x, A, B, s)) == 0);
  }
  {  // A frozen and rows without a gradient (a route mask): only x and B get theirs, and the right ones
    Tensor x = at::randn({3, 7, in}, f32).requires_grad_(true), A = at::randn({r, in}, f32) * 0.2, B = (at::randn({out, r}, f32) * 0.2).requires_grad_(true);
    const Tensor rows = at::rand({3, 1, 1}, f32), g = at::randn({3, 7, out}, f32);
    torch::autograd::backward({low_rank(x, A, B, s, rows)}, {g});
    Tensor x64 = x.detach().to(at::kDouble).requires_grad_(true), B64 = B.detach().to(at::kDouble).requires_grad_(true);
    torch::autograd::backward({at::matmul(at::matmul(x64, A.to(at::kDouble).t()) * rows.to(at::kDouble), B64.t()) * s}, {g.to(at::kDouble)});
    CATCH_CHECK(max_abs_diff(x.grad().to(at::kDouble), x64.grad()) <= 1e-5 * std::max(1.0, scale(x64.grad())));
    CATCH_CHECK(max_abs_diff(B.grad().to(at::kDouble), B64.grad()) <= 1e-5 * std::max(1.0, scale(B64.grad())));
  }
  {  // a bf16 x with float32 masters and rows: the gradients arrive in float32, the rows' summed in float32
    Tensor x = at::randn({3, 7, in}, f32).to(at::kBFloat16).requires_grad_(true);
    Tensor A = (at::randn({r, in}, f32) * 0.2).requires_grad_(true), B = (at::randn({out, r}, f32) * 0.2).requires_grad_(true);
    Tensor rows = at::rand({3, 1, 1}, f32).requires_grad_(true);
    const Tensor g = at::randn({3, 7, out}, f32).to(at::kBFloat16);
    Tensor y = low_rank(x, A, B, s, rows);
    CATCH_CHECK(y.scalar_type() == at::kBFloat16);
    torch::autograd::backward({y}, {g});
    CATCH_CHECK(A.grad().scalar_type() == at::kFloat);
    CATCH_CHECK(B.grad().scalar_type() == at::kFloat);
    CATCH_CHECK(rows.grad().scalar_type() == at::kFloat);
    Tensor r64 = rows.detach().to(at::kDouble).requires_grad_(true);
    torch::autograd::backward({at::matmul(at::matmul(x.detach().to(at::kDouble), A.detach().to(at::kDouble).t()) * r64, B.detach().to(at::kDouble).t()) * s},
                              {g.to(at::kDouble)});
    CATCH_CHECK(max_abs_diff(rows.grad().to(at::kDouble), r64.grad()) <= 2e-2 * scale(r64.grad()));  // bf16 products: a percent or two
  }
  const Tensor x = at::randn({2, 3, in}), A = at::randn({r, in}), B = at::randn({out, r});
  CATCH_CHECK_THROWS_WITH(low_rank(x, A, B, 1.0, at::ones({2, 3, 2})), Catch::Contains("not one weight per row"));
}

CATCH_TEST_CASE("low_rank: a bf16 x with float32 masters computes in bf16, and the masters' gradients arrive in float32", "[sdk][low_rank]") {
  at::manual_seed(4);
  const auto f32 = test::options();
  Tensor x = at::randn({16, 32}, f32).to(at::kBFloat16).requires_grad_(true);
  Tensor A = (at::randn({8, 32}, f32) * 0.2).requires_grad_(true), B = (at::randn({24, 8}, f32) * 0.2).requires_grad_(true);
  Tensor g = at::randn({16, 24}, f32).to(at::kBFloat16);
  Tensor y = low_rank(x, A, B, 2.0);
  CATCH_CHECK(y.scalar_type() == at::kBFloat16);
  torch::autograd::backward({y}, {g});
  CATCH_CHECK(A.grad().scalar_type() == at::kFloat);
  CATCH_CHECK(B.grad().scalar_type() == at::kFloat);
  CATCH_CHECK(x.grad().scalar_type() == at::kBFloat16);
  const Grads ref = reference(x, A, B, 2.0, g);
  // bf16 keeps 8 bits of mantissa: a few parts in a hundred of each tensor's scale.
  CATCH_CHECK(max_abs_diff(y, ref.y) < 3e-2 * scale(ref.y));
  CATCH_CHECK(max_abs_diff(A.grad(), ref.A) < 3e-2 * scale(ref.A));
  CATCH_CHECK(max_abs_diff(B.grad(), ref.B) < 3e-2 * scale(ref.B));
  CATCH_CHECK(max_abs_diff(x.grad(), ref.x) < 3e-2 * scale(ref.x));
}

CATCH_TEST_CASE("low_rank: shapes that do not chain are refused with the three shapes", "[sdk][low_rank]") {
  const auto f32 = test::options();
  CATCH_CHECK_THROWS_WITH(low_rank(at::zeros({2, 5}, f32), at::zeros({4, 6}, f32), at::zeros({3, 4}, f32), 1.0),
                          Catch::Contains("low_rank: x [2, 5], A [4, 6], B [3, 4] do not chain as x Aᵀ Bᵀ"));
}

// ---- low_rank_group (SDK 2.6): several updates of one input, each on its own dropout ------

namespace {

struct Update {
  Tensor A, B;
  double s;
};

// Σ_i ⟨y_i, g_i⟩'s gradients in float64, y_i = s_i ((x ∘ keep_i · c) A_iᵀ) B_iᵀ (keep
// undefined: no dropout), and the float32 bounds of each (bounds() above, per update; x's
// gradient is the sum of the updates' through their masks, one more rounding each).
struct GroupGrads {
  std::vector<Tensor> y, A, B, y_bound, A_bound, B_bound;
  Tensor x, x_bound;
};

GroupGrads group_reference(const Tensor& x, const std::vector<Update>& ups, const std::vector<Tensor>& g, const Tensor& keep, double c) {
  GroupGrads out;
  Tensor x64 = x.detach().to(at::kDouble).requires_grad_(true);
  std::vector<Tensor> As, Bs, ys;
  out.x_bound = at::zeros(x.sizes(), x64.options());
  for (std::size_t i = 0; i < ups.size(); ++i) {
    const Tensor mask = keep.defined() ? keep[static_cast<std::int64_t>(i)].view(x.sizes()).to(at::kDouble) * c : at::ones(x.sizes(), x64.options());
    As.push_back(ups[i].A.detach().to(at::kDouble).requires_grad_(true));
    Bs.push_back(ups[i].B.detach().to(at::kDouble).requires_grad_(true));
    ys.push_back(at::matmul(at::matmul(x64 * mask, As.back().t()), Bs.back().t()) * ups[i].s);
    const Grads b = bounds(x.detach() * mask.to(x.scalar_type()), ups[i].A, ups[i].B, ups[i].s, g[i]);
    out.y_bound.push_back(b.y), out.A_bound.push_back(b.A), out.B_bound.push_back(b.B);
    out.x_bound = out.x_bound + b.x * mask;
  }
  torch::autograd::backward(ys, std::vector<Tensor>(g.begin(), g.end()));
  for (std::size_t i = 0; i < ups.size(); ++i) out.y.push_back(ys[i].detach()), out.A.push_back(As[i].grad()), out.B.push_back(Bs[i].grad());
  out.x = x64.grad();
  // The sum's own roundings; where every mask dropped an element its gradient must be exactly
  // 0, which the smallest normal double as its bound demands.
  out.x_bound = out.x_bound + test::gamma(static_cast<std::int64_t>(ups.size()) + 1) * out.x_bound + std::numeric_limits<double>::min();
  return out;
}

std::vector<Update> three_updates(std::int64_t in) {
  const auto f32 = test::options();
  std::vector<Update> ups;
  for (auto [r, out, s] : {std::tuple<std::int64_t, std::int64_t, double>{4, 40, 2.0}, {8, 24, 0.5}, {2, 40, 1.0}})
    ups.push_back({(at::randn({r, in}, f32) * 0.2).requires_grad_(true), (at::randn({out, r}, f32) * 0.2).requires_grad_(true), s});
  return ups;
}

std::vector<LowRankFactors> factors_of(const std::vector<Update>& ups) {
  std::vector<LowRankFactors> f;
  for (const auto& u : ups) f.push_back({u.A, u.B, u.s});
  return f;
}

void check_group(const std::vector<Tensor>& y, const std::vector<Update>& ups, const Tensor& x, const GroupGrads& ref) {
  for (std::size_t i = 0; i < ups.size(); ++i) {
    CATCH_INFO("update " << i);
    CATCH_CHECK(y[i].sizes() == ref.y[i].sizes());
    CATCH_CHECK(test::bound_ratio(y[i], ref.y[i], ref.y_bound[i]) <= 1);
    CATCH_CHECK(test::bound_ratio(ups[i].A.grad(), ref.A[i], ref.A_bound[i]) <= 1);
    CATCH_CHECK(test::bound_ratio(ups[i].B.grad(), ref.B[i], ref.B_bound[i]) <= 1);
  }
  CATCH_CHECK(test::bound_ratio(x.grad(), ref.x, ref.x_bound) <= 1);
}

}  // namespace

CATCH_TEST_CASE("low_rank_group without dropout: each update and every gradient equal autograd's of s_i (x A_iᵀ) B_iᵀ", "[sdk][low_rank]") {
  at::manual_seed(5);
  const std::int64_t in = 48;
  auto ups = three_updates(in);
  Tensor x = at::randn({3, 7, in}, test::options()).requires_grad_(true);
  std::vector<Tensor> g;
  for (const auto& u : ups) g.push_back(at::randn({3, 7, u.B.size(0)}, test::options()));
  for (auto [p, training] : {std::pair<double, bool>{0.0, true}, {0.3, false}}) {  // no dropout either way
    CATCH_INFO("p " << p << ", training " << training);
    for (auto& u : ups) u.A.mutable_grad() = Tensor(), u.B.mutable_grad() = Tensor();
    x.mutable_grad() = Tensor();
    auto y = low_rank_group(x, factors_of(ups), p, training);
    torch::autograd::backward(y, g);
    check_group(y, ups, x, group_reference(x, ups, g, Tensor(), 1.0));
  }
}

CATCH_TEST_CASE("low_rank_group with dropout: each update on its own mask, as tessera::dropout draws them for the whole group", "[sdk][low_rank][dropout]") {
  if (!test::device().is_cpu()) return;  // the masks are reproducible from the seed on the CPU path
  at::manual_seed(6);
  const std::int64_t in = 48;
  const double p = 0.25;
  auto ups = three_updates(in);
  Tensor x = at::randn({3, 7, in}, test::options()).requires_grad_(true);
  std::vector<Tensor> g;
  for (const auto& u : ups) g.push_back(at::randn({3, 7, u.B.size(0)}, test::options()));
  at::manual_seed(60);
  auto y = low_rank_group(x, factors_of(ups), p, true);
  torch::autograd::backward(y, g);
  // The same draws: one dropout of 3 · x.numel() elements from the same seed.
  at::manual_seed(60);
  const Tensor keep = tessera::dropout(at::ones({3, x.numel()}, test::options()), p, true) != 0;  // (3, n·in)
  const double used = std::round(p * 32768) / 32768;
  CATCH_CHECK(keep.to(at::kDouble).mean().item<double>() > 0.6);
  CATCH_CHECK((keep[0] != keep[1]).any().item<bool>());  // each its own mask
  check_group(y, ups, x, group_reference(x, ups, g, keep, 1.0 / (1.0 - used)));
}

CATCH_TEST_CASE("low_rank_group: an update whose output gets no gradient leaves the others' gradients exact", "[sdk][low_rank]") {
  at::manual_seed(7);
  const std::int64_t in = 32;
  auto ups = three_updates(in);
  Tensor x = at::randn({10, in}, test::options()).requires_grad_(true);
  auto y = low_rank_group(x, factors_of(ups), 0.0, true);
  Tensor g1 = at::randn({10, ups[1].B.size(0)}, test::options());
  torch::autograd::backward({y[1]}, {g1});  // the middle update alone: y_0 and y_2 unused
  std::vector<Update> middle = {ups[1]};
  const GroupGrads ref = group_reference(x, middle, {g1}, Tensor(), 1.0);
  CATCH_CHECK(test::bound_ratio(ups[1].A.grad(), ref.A[0], ref.A_bound[0]) <= 1);
  CATCH_CHECK(test::bound_ratio(ups[1].B.grad(), ref.B[0], ref.B_bound[0]) <= 1);
  CATCH_CHECK(test::bound_ratio(x.grad(), ref.x, ref.x_bound) <= 1);
  for (std::size_t i : {0, 2}) CATCH_CHECK((!ups[i].A.grad().defined() || ups[i].A.grad().abs().max().item<double>() == 0.0));
}

CATCH_TEST_CASE("low_rank_group: a dropout below 0 or of 1 and more, and shapes that do not chain, are refused", "[sdk][low_rank]") {
  const auto f32 = test::options();
  std::vector<LowRankFactors> f = {{at::zeros({4, 5}, f32), at::zeros({3, 4}, f32), 1.0}};
  CATCH_CHECK_THROWS_WITH(low_rank_group(at::zeros({2, 5}, f32), f, 1.0, true), Catch::Contains("dropout must lie in [0, 1)"));
  f.push_back({at::zeros({4, 6}, f32), at::zeros({3, 4}, f32), 1.0});
  CATCH_CHECK_THROWS_WITH(low_rank_group(at::zeros({2, 5}, f32), f, 0.0, true), Catch::Contains("low_rank_group: x [2, 5], A [4, 6], B [3, 4] do not chain"));
}

CATCH_TEST_CASE("low_rank_group with rows: each update and every gradient, the rows' too, equal autograd's of s_i ((drop_i(x) A_iᵀ) ∘ rows_i) B_iᵀ (SDK 2.8)",
                "[sdk][low_rank][dropout]") {
  if (!test::device().is_cpu()) return;  // the masks are reproducible from the seed on the CPU path
  at::manual_seed(8);
  const std::int64_t in = 48;
  for (const double p : {0.0, 0.25}) {
    CATCH_INFO("dropout " << p);
    auto ups = three_updates(in);
    Tensor x = at::randn({3, 7, in}, test::options()).requires_grad_(true);
    std::vector<Tensor> rows, g;
    for (const auto& u : ups) {
      rows.push_back(at::rand({3, 1, 1}, test::options()).requires_grad_(true));  // a gate per sample
      g.push_back(at::randn({3, 7, u.B.size(0)}, test::options()));
    }
    at::manual_seed(80);
    auto y = low_rank_group(x, factors_of(ups), p, true, rows);
    torch::autograd::backward(y, g);
    // The formula in float64, on the same draws (one dropout of 3 · x.numel() elements).
    at::manual_seed(80);
    const Tensor keep = p > 0 ? (tessera::dropout(at::ones({3, x.numel()}, test::options()), p, true) != 0) : Tensor();
    const double c = p > 0 ? 1.0 / (1.0 - std::round(p * 32768) / 32768) : 1.0;
    Tensor x64 = x.detach().to(at::kDouble).requires_grad_(true);
    for (std::size_t i = 0; i < ups.size(); ++i) {
      CATCH_INFO("update " << i);
      Tensor A64 = ups[i].A.detach().to(at::kDouble).requires_grad_(true), B64 = ups[i].B.detach().to(at::kDouble).requires_grad_(true);
      Tensor r64 = rows[i].detach().to(at::kDouble).requires_grad_(true);
      const Tensor xi = keep.defined() ? x64 * keep[static_cast<std::int64_t>(i)].view(x.sizes()).to(at::kDouble) * c : x64;
      Tensor y64 = at::matmul(at::matmul(xi, A64.t()) * r64, B64.t()) * ups[i].s;
      torch::autograd::backward({y64}, {g[i].to(at::kDouble)});
      auto close = [](const Tensor& a, const Tensor& b) { return max_abs_diff(a.to(at::kDouble), b) <= 1e-5 * std::max(1.0, scale(b)); };
      CATCH_CHECK(close(y[i], y64.detach()));
      CATCH_CHECK(close(ups[i].A.grad(), A64.grad()));
      CATCH_CHECK(close(ups[i].B.grad(), B64.grad()));
      CATCH_CHECK(rows[i].grad().sizes() == rows[i].sizes());
      CATCH_CHECK(close(rows[i].grad(), r64.grad()));
    }
    CATCH_CHECK(max_abs_diff(x.grad().to(at::kDouble), x64.grad()) <= 1e-5 * std::max(1.0, scale(x64.grad())));
  }
  const Tensor x = at::randn({2, 48});
  CATCH_CHECK_THROWS_WITH(low_rank_group(x, factors_of(three_updates(48)), 0.0, false, {at::ones({2, 1})}), Catch::Contains("1 row weights for 3 updates"));
}
