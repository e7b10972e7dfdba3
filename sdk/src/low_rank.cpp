#include <tessera/low_rank.h>

#include <tessera/dense_linear.h>
#include <tessera/internal/dropout_mask.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <stdexcept>
#include <string>
#include <tuple>

namespace tessera {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// t's shape with its last size replaced.
std::vector<std::int64_t> with_last(const at::Tensor& t, std::int64_t last) {
  auto shape = t.sizes().vec();
  shape.back() = last;
  return shape;
}

// rows (broadcasting against x's leading sizes, last size 1) as one weight per row of x2: (n, 1).
at::Tensor per_row(const at::Tensor& rows, const at::Tensor& x) {
  return rows.to(x.scalar_type()).expand(with_last(x, 1)).reshape({-1, 1});
}

// Σ_r ∂(u ∘ rows) ∘ u for each row, (n, 1): the rows' gradient, summed in float32 at least
// (a bf16 sum over r would round).
at::Tensor row_sums(const at::Tensor& gv, const at::Tensor& u) {
  const auto acc = at::promote_types(u.scalar_type(), at::kFloat);
  return (gv.to(acc) * u.to(acc)).sum(1, true);
}

struct LowRank : torch::autograd::Function<LowRank> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, double s) {
    const at::Tensor x2 = x.reshape({-1, x.size(-1)});         // (n, in)
    const at::Tensor Ax = A.to(x.scalar_type());               // (r, in)
    const at::Tensor sB = B.to(x.scalar_type()) * s;           // (out, r)
    const at::Tensor u = dense_linear(x2, Ax);                 // (n, r)
    // x is needed only for ∂A: a frozen A (LoRA-FA) keeps just the r-wide u, so a dropped
    // input (a tensor of this branch alone) is freed after the forward pass.
    ctx->save_for_backward({A.requires_grad() ? x2 : at::Tensor(), u, Ax, sB});
    ctx->saved_data["s"] = s;
    ctx->saved_data["A_dtype"] = static_cast<std::int64_t>(A.scalar_type());  // the masters' gradients arrive in their dtype
    ctx->saved_data["B_dtype"] = static_cast<std::int64_t>(B.scalar_type());
    return at::mm(u, sB.t()).view(with_last(x, B.size(0)));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x2 = saved[0], &u = saved[1], &Ax = saved[2], &sB = saved[3];
    const at::Tensor g = grad_out[0].reshape({-1, sB.size(0)});  // (n, out)
    const at::Tensor gu = dense_linear(g, sB.t());                // (n, r) = g (s B)
    auto [gx, gA, gB] = factor_grads(ctx, grad_out[0], g, gu, u, x2, Ax);
    return {gx, gA, gB, at::Tensor()};
  }

  // ∂x, ∂A, ∂B from ∂u (n, r) and the u that met B (n, r); each where autograd asks for it.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> factor_grads(AutogradContext* ctx, const at::Tensor& grad_y, const at::Tensor& g, const at::Tensor& gu,
                                                                      const at::Tensor& u_at_B, const at::Tensor& x2, const at::Tensor& Ax) {
    const double s = ctx->saved_data["s"].toDouble();
    auto dtype = [&](const char* key) { return static_cast<at::ScalarType>(ctx->saved_data[key].toInt()); };
    at::Tensor gx, gA, gB;
    if (ctx->needs_input_grad(0)) gx = at::mm(gu, Ax).view(with_last(grad_y, Ax.size(1)));           // (..., in)
    if (ctx->needs_input_grad(1)) gA = at::mm(gu.t(), x2).to(dtype("A_dtype"));                      // (r, in)
    if (ctx->needs_input_grad(2)) gB = at::mm(u_at_B.t(), g).t().mul(s).contiguous().to(dtype("B_dtype"));  // (out, r)
    return {gx, gA, gB};
  }
};

// y = s · ((x Aᵀ) ∘ rows) Bᵀ: the weight of each row on the r-wide product (SDK 2.8).
struct LowRankRows : torch::autograd::Function<LowRankRows> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, double s, const at::Tensor& rows) {
    const at::Tensor x2 = x.reshape({-1, x.size(-1)});  // (n, in)
    const at::Tensor Ax = A.to(x.scalar_type());        // (r, in)
    const at::Tensor sB = B.to(x.scalar_type()) * s;    // (out, r)
    const at::Tensor r2 = per_row(rows, x);             // (n, 1)
    const at::Tensor u = dense_linear(x2, Ax);          // (n, r)
    ctx->save_for_backward({A.requires_grad() ? x2 : at::Tensor(), u, Ax, sB, r2});
    ctx->saved_data["s"] = s;
    ctx->saved_data["A_dtype"] = static_cast<std::int64_t>(A.scalar_type());
    ctx->saved_data["B_dtype"] = static_cast<std::int64_t>(B.scalar_type());
    ctx->saved_data["rows_sizes"] = rows.sizes().vec();
    ctx->saved_data["rows_dtype"] = static_cast<std::int64_t>(rows.scalar_type());
    return at::mm(u * r2, sB.t()).view(with_last(x, B.size(0)));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x2 = saved[0], &u = saved[1], &Ax = saved[2], &sB = saved[3], &r2 = saved[4];
    const at::Tensor g = grad_out[0].reshape({-1, sB.size(0)});  // (n, out)
    const at::Tensor gv = dense_linear(g, sB.t());                // (n, r): ∂(u ∘ rows)
    at::Tensor grows;
    if (ctx->needs_input_grad(3))  // the tensor inputs' 4th: Σ_r ∂(u ∘ rows) ∘ u, r wide where a weight on y would read out
      grows = row_sums(gv, u).view(with_last(grad_out[0], 1)).sum_to_size(ctx->saved_data["rows_sizes"].toIntVector())
                  .to(static_cast<at::ScalarType>(ctx->saved_data["rows_dtype"].toInt()));
    auto [gx, gA, gB] = LowRank::factor_grads(ctx, grad_out[0], g, gv * r2, u * r2, x2, Ax);
    return {gx, gA, gB, at::Tensor(), grows};
  }
};


// ---- several updates of one input --------------------------------------------------------

// What a group's forward computes, and what its backward needs.
struct GroupPass {
  std::vector<at::Tensor> y;   // y_i (n, out_i)
  std::vector<at::Tensor> u;   // u_i = drop_i(x) A_iᵀ (n, r_i); without dropout, columns of U
  std::vector<at::Tensor> A;   // A_i in x's dtype (r_i, in)
  std::vector<at::Tensor> sB;  // s_i c B_i in x's dtype (out_i, r_i), c = 1/(1 − p) while dropping
  at::Tensor keep;             // (m, n, in) bool while dropping, else undefined
  at::Tensor A_cat;            // [A_1; …; A_m] (R, in) without dropout, else undefined
  std::vector<double> cs;      // s_i c: the scale folded into sB_i
};

// The keep flags of m dropouts of x2 (n, in): (m, n, in) bool. On the CPU tessera::dropout's
// draws, in one pass; elsewhere a uniform draw against 1 − p.
at::Tensor group_keep(const at::Tensor& x2, std::int64_t m, double p) {
  if (x2.device().is_cpu()) return internal::draw_keep(m * x2.numel(), p).view({m, x2.size(0), x2.size(1)});
  return at::rand({m, x2.size(0), x2.size(1)}, x2.options().dtype(at::kFloat)) >= p;
}

// rows: empty, or each update's weight per row of x, (n, 1) (SDK 2.8): y_i = (u_i ∘ rows_i) sB_iᵀ.
GroupPass group_forward(const at::Tensor& x2, at::TensorList As, at::TensorList Bs, const std::vector<double>& s, double p, const std::vector<at::Tensor>& rows) {
  const auto m = static_cast<std::int64_t>(As.size());
  const auto dt = x2.scalar_type();
  GroupPass pass;
  const double used = p == 0.0 ? 0.0 : x2.device().is_cpu() ? internal::rounded_dropout(p) : p;
  const double c = 1.0 / (1.0 - used);  // the dropout's scale, folded into B
  for (std::int64_t i = 0; i < m; ++i) {
    pass.A.push_back(As[i].to(dt));
    pass.cs.push_back(s[static_cast<std::size_t>(i)] * c);
    pass.sB.push_back(Bs[i].to(dt) * pass.cs.back());
  }
  if (used > 0.0) {
    pass.keep = group_keep(x2, m, p);
    for (std::int64_t i = 0; i < m; ++i) pass.u.push_back(dense_linear(internal::masked_scale(x2, pass.keep[i], 1.0), pass.A[static_cast<std::size_t>(i)]));  // (n, r_i)
  } else {
    pass.A_cat = m == 1 ? pass.A[0] : at::cat(pass.A, 0);  // (R, in)
    const at::Tensor U = dense_linear(x2, pass.A_cat);        // (n, R): x read once for every update
    std::int64_t at_col = 0;
    for (const auto& A : pass.A) pass.u.push_back(U.narrow(1, at_col, A.size(0))), at_col += A.size(0);
  }
  for (std::size_t i = 0; i < pass.u.size(); ++i) pass.y.push_back(at::mm(rows.empty() ? pass.u[i] : pass.u[i] * rows[i], pass.sB[i].t()));
  return pass;
}

struct LowRankGroup : torch::autograd::Function<LowRankGroup> {
  // Saved: x2 (undefined when no A_i trains), keep or A_cat, then per update u_i, A_i, sB_i,
  // then the rows as given, when there are (an empty list: none).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList As, at::TensorList Bs, std::vector<double> s, double p,
                               at::TensorList Rows) {
    const at::Tensor x2 = x.reshape({-1, x.size(-1)});  // (n, in)
    std::vector<at::Tensor> r2;
    for (const auto& r : Rows) r2.push_back(per_row(r, x));  // (n, 1) each
    GroupPass pass = group_forward(x2, As, Bs, s, p, r2);
    bool any_A = false;
    for (const auto& A : As) any_A |= A.requires_grad();
    variable_list saved = {any_A ? x2 : at::Tensor(), pass.keep.defined() ? pass.keep : pass.A_cat};
    variable_list out;
    for (std::size_t i = 0; i < As.size(); ++i) {
      saved.insert(saved.end(), {pass.u[i], pass.A[i], pass.sB[i]});
      out.push_back(pass.y[i].view(with_last(x, Bs[i].size(0))));
    }
    for (const auto& r : Rows) saved.push_back(r);
    ctx->save_for_backward(saved);
    ctx->saved_data["dropping"] = pass.keep.defined();
    ctx->saved_data["x_sizes"] = x.sizes().vec();  // ∂x's shape
    ctx->saved_data["c_s"] = pass.cs;
    std::vector<std::int64_t> dtypes;
    for (std::size_t i = 0; i < As.size(); ++i) dtypes.push_back(static_cast<std::int64_t>(As[i].scalar_type())), dtypes.push_back(static_cast<std::int64_t>(Bs[i].scalar_type()));
    ctx->saved_data["dtypes"] = dtypes;  // the masters' gradients arrive in their dtypes
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto m = static_cast<std::int64_t>(grads.size());
    const at::Tensor& x2 = saved[0];
    const bool dropping = ctx->saved_data["dropping"].toBool();
    const auto cs = ctx->saved_data["c_s"].toDoubleVector();
    const auto dtypes = ctx->saved_data["dtypes"].toIntVector();
    auto u = [&](std::int64_t i) -> const at::Tensor& { return saved[static_cast<std::size_t>(2 + 3 * i)]; };
    auto A = [&](std::int64_t i) -> const at::Tensor& { return saved[static_cast<std::size_t>(3 + 3 * i)]; };
    auto sB = [&](std::int64_t i) -> const at::Tensor& { return saved[static_cast<std::size_t>(4 + 3 * i)]; };
    const bool rowed = saved.size() > static_cast<std::size_t>(2 + 3 * m);  // each update's rows after the triples
    const auto x_sizes = ctx->saved_data["x_sizes"].toIntVector();
    variable_list result(static_cast<std::size_t>(1 + 2 * m + 2 + (rowed ? m : 0)));  // x, A_i…, B_i…, s, p, rows_i…
    std::vector<at::Tensor> gu(static_cast<std::size_t>(m));       // ∂u_i (n, r_i); undefined where y_i got no gradient
    for (std::int64_t i = 0; i < m; ++i) {
      if (!grads[static_cast<std::size_t>(i)].defined()) continue;
      const at::Tensor g = grads[static_cast<std::size_t>(i)].reshape({-1, sB(i).size(0)});  // (n, out_i)
      at::Tensor gi = dense_linear(g, sB(i).t());                                             // g (s c B): ∂ of what met B
      at::Tensor met = u(i);                                                                  // u_i, or u_i ∘ rows_i
      if (rowed) {
        const at::Tensor& rows = saved[static_cast<std::size_t>(2 + 3 * m + i)];
        auto shape = x_sizes;
        shape.back() = 1;
        const at::Tensor r2 = rows.to(u(i).scalar_type()).expand(shape).reshape({-1, 1});  // (n, 1)
        if (ctx->needs_input_grad(static_cast<std::size_t>(1 + 2 * m + i)))  // the rows' edge: Σ_r ∂(u ∘ rows) ∘ u, r wide
          result[static_cast<std::size_t>(1 + 2 * m + 2 + i)] = row_sums(gi, u(i)).view(shape).sum_to_size(rows.sizes()).to(rows.scalar_type());
        gi = gi * r2, met = met * r2;
      }
      gu[static_cast<std::size_t>(i)] = gi;
      if (ctx->needs_input_grad(static_cast<std::size_t>(1 + m + i)))
        result[static_cast<std::size_t>(1 + m + i)] = at::mm(met.t(), g).t().mul(cs[static_cast<std::size_t>(i)]).contiguous().to(static_cast<at::ScalarType>(dtypes[static_cast<std::size_t>(2 * i + 1)]));
    }
    const auto A_dtype = [&](std::int64_t i) { return static_cast<at::ScalarType>(dtypes[static_cast<std::size_t>(2 * i)]); };
    at::Tensor gx;
    if (dropping) {
      const at::Tensor& keep = saved[1];  // (m, n, in)
      for (std::int64_t i = 0; i < m; ++i) {
        const at::Tensor& gui = gu[static_cast<std::size_t>(i)];
        if (!gui.defined()) continue;
        if (ctx->needs_input_grad(static_cast<std::size_t>(1 + i)))
          result[static_cast<std::size_t>(1 + i)] = at::mm(gui.t(), internal::masked_scale(x2, keep[i], 1.0)).to(A_dtype(i));  // (r_i, in)
        if (!ctx->needs_input_grad(0)) continue;
        const at::Tensor t = at::mm(gui, A(i));  // (n, in): this update's ∂x before its mask
        if (gx.defined()) internal::masked_add_(gx, t, keep[i]);
        else gx = internal::masked_scale(t, keep[i], 1.0);
      }
    } else {
      const at::Tensor& A_cat = saved[1];  // (R, in)
      std::vector<at::Tensor> parts;
      for (std::int64_t i = 0; i < m; ++i)
        parts.push_back(gu[static_cast<std::size_t>(i)].defined() ? gu[static_cast<std::size_t>(i)] : at::zeros_like(u(i)));
      const at::Tensor GU = m == 1 ? parts[0] : at::cat(parts, 1);  // (n, R)
      if (ctx->needs_input_grad(0)) gx = at::mm(GU, A_cat);          // (n, in): one product for every update
      if (x2.defined()) {
        const at::Tensor gA = at::mm(GU.t(), x2);  // (R, in)
        std::int64_t at_row = 0;
        for (std::int64_t i = 0; i < m; ++i) {
          if (ctx->needs_input_grad(static_cast<std::size_t>(1 + i))) result[static_cast<std::size_t>(1 + i)] = gA.narrow(0, at_row, A(i).size(0)).to(A_dtype(i));
          at_row += A(i).size(0);
        }
      }
    }
    if (gx.defined()) result[0] = gx.view(x_sizes);
    return result;
  }
};

}  // namespace

at::Tensor low_rank(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, double scaling) { return low_rank(x, A, B, scaling, at::Tensor()); }

at::Tensor low_rank(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, double scaling, const at::Tensor& rows) {
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2 && A.size(0) == B.size(1) && x.size(-1) == A.size(1), "low_rank: x ", x.sizes(), ", A ",
              A.sizes(), ", B ", B.sizes(), " do not chain as x Aᵀ Bᵀ");
  TORCH_CHECK(!rows.defined() || (rows.dim() >= 1 && rows.size(-1) == 1), "low_rank: rows ", rows.sizes(), " are not one weight per row of x ", x.sizes());
  const bool grad = at::GradMode::is_enabled() && (x.requires_grad() || A.requires_grad() || B.requires_grad() || (rows.defined() && rows.requires_grad()));
  if (grad) return rows.defined() ? LowRankRows::apply(x, A, B, scaling, rows) : LowRank::apply(x, A, B, scaling);
  // Nothing to record: the same products, without the autograd node.
  const at::Tensor sB = B.to(x.scalar_type()) * scaling;
  at::Tensor u = dense_linear(x.reshape({-1, x.size(-1)}), A.to(x.scalar_type()));  // (n, r)
  if (rows.defined()) u = u * per_row(rows, x);
  return at::mm(u, sB.t()).view(with_last(x, B.size(0)));
}

std::vector<at::Tensor> low_rank_group(const at::Tensor& x, const std::vector<LowRankFactors>& updates, double dropout, bool training) {
  return low_rank_group(x, updates, dropout, training, {});
}

std::vector<at::Tensor> low_rank_group(const at::Tensor& x, const std::vector<LowRankFactors>& updates, double dropout, bool training,
                                       const std::vector<at::Tensor>& rows) {
  if (!(dropout >= 0.0 && dropout < 1.0)) throw std::invalid_argument("low_rank_group: dropout must lie in [0, 1), got " + std::to_string(dropout));
  if (!rows.empty() && rows.size() != updates.size())
    throw std::invalid_argument("low_rank_group: " + std::to_string(rows.size()) + " row weights for " + std::to_string(updates.size()) + " updates");
  if (updates.empty()) return {};
  std::vector<at::Tensor> As, Bs;
  std::vector<double> s;
  bool grad = at::GradMode::is_enabled() && x.requires_grad();
  for (const auto& f : updates) {
    TORCH_CHECK(f.A.dim() == 2 && f.B.dim() == 2 && f.A.size(0) == f.B.size(1) && x.size(-1) == f.A.size(1), "low_rank_group: x ", x.sizes(),
                ", A ", f.A.sizes(), ", B ", f.B.sizes(), " do not chain as x Aᵀ Bᵀ");
    As.push_back(f.A), Bs.push_back(f.B), s.push_back(f.scaling);
    grad |= at::GradMode::is_enabled() && (f.A.requires_grad() || f.B.requires_grad());
  }
  for (const auto& r : rows) {
    TORCH_CHECK(r.defined() && r.dim() >= 1 && r.size(-1) == 1, "low_rank_group: rows ", r.defined() ? r.sizes() : at::IntArrayRef{},
                " are not one weight per row of x ", x.sizes());
    grad |= at::GradMode::is_enabled() && r.requires_grad();
  }
  const double p = training ? dropout : 0.0;
  // As TensorLists, so that autograd counts each factor as an input (a vector would be one opaque argument).
  if (grad) return LowRankGroup::apply(x, at::TensorList(As), at::TensorList(Bs), s, p, at::TensorList(rows));
  // Nothing to record: the same products, without the autograd node.
  std::vector<at::Tensor> r2;
  for (const auto& r : rows) r2.push_back(per_row(r, x));
  GroupPass pass = group_forward(x.reshape({-1, x.size(-1)}), As, Bs, s, p, r2);
  for (std::size_t i = 0; i < pass.y.size(); ++i) pass.y[i] = pass.y[i].view(with_last(x, Bs[i].size(0)));
  return pass.y;
}

}  // namespace tessera
