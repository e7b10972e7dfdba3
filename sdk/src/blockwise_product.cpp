// Products through a quantized weight, a slab at a time (QLoRA's frozen base on a CPU): a
// slab of the weight — rows for x Wᵀ, columns for the input's gradient g W — is dequantized
// by the format's own row kernel (a table lookup and a multiply a value, the threads taking
// rows) and multiplied at once, one BLAS call writing straight into its columns of the
// output (oneDNN's product when the weight is one slab). Nothing dense outlives the product,
// and no product holds more than one slab.
#include <tessera/dense_linear.h>
#include <tessera/internal/sites_impl.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace tessera {
namespace {

// Dequantized values a slab holds: 4 MiB of f32. Smaller slabs (in L2) were measured slower:
// BLAS runs short products at a fraction of its speed, and the values cost little to make
// (bench/quantized_product.cpp). A slab bounds what a product holds on a large model; on
// SmolLM2 a weight is one slab.
constexpr std::int64_t kSlabValues = 1024 * 1024;

// Rows [r0, r0 + n) × columns [c0, c0 + cols) of w into `piece` (n, cols), rows split among
// the threads.
void dequantize(const StoredTensor& w, std::int64_t r0, std::int64_t n, std::int64_t c0, std::int64_t cols, Tensor& piece) {
  float* out = piece.data_ptr<float>();
  at::parallel_for(0, n, std::max<std::int64_t>(1, 4096 / cols), [&](std::int64_t a, std::int64_t b) {
    for (std::int64_t r = a; r < b; ++r) w.dequantize_row(r0 + r, c0, c0 + cols, out + r * cols);
  });
}

// x (T, in) contiguous -> (T, out)
Tensor forward_2d(const Tensor& x, const StoredTensor& w) {
  const std::int64_t out = w.rows(), in = x.size(1);
  const std::int64_t rows = std::min(out, std::max<std::int64_t>(1, kSlabValues / in));
  Tensor piece = at::empty({rows, in}, x.options());
  if (rows == out) {  // one slab: the whole weight, one product
    dequantize(w, 0, out, 0, in, piece);
    return dense_linear(x, piece);  // (T, out), on oneDNN as a dense weight's
  }
  Tensor y = at::empty({x.size(0), out}, x.options());  // (T, out)
  for (std::int64_t r0 = 0; r0 < out; r0 += rows) {
    const std::int64_t n = std::min(rows, out - r0);
    Tensor p = piece.narrow(0, 0, n);
    dequantize(w, r0, n, 0, in, p);
    Tensor columns = y.narrow(1, r0, n);  // strided rows: BLAS writes them in place
    at::mm_out(columns, x, p.t());
  }
  return y;
}

// g (T, out) contiguous -> (T, in)
Tensor input_grad_2d(const Tensor& g, const StoredTensor& w, std::int64_t in) {
  const std::int64_t out = w.rows(), step = w.column_step();
  const std::int64_t cols = std::min(in, std::max<std::int64_t>(1, kSlabValues / out / step) * step);
  Tensor piece = at::empty({out, cols}, g.options());
  if (cols == in) {
    dequantize(w, 0, out, 0, in, piece);
    return dense_linear(g, piece.t());  // (T, in)
  }
  Tensor gx = at::empty({g.size(0), in}, g.options());  // (T, in)
  for (std::int64_t c0 = 0; c0 < in; c0 += cols) {
    const std::int64_t n = std::min(cols, in - c0);
    Tensor p = n == cols ? piece : at::empty({out, n}, g.options());
    dequantize(w, 0, out, c0, n, p);
    Tensor columns = gx.narrow(1, c0, n);
    at::mm_out(columns, g, p);
  }
  return gx;
}

// The last dimension swapped for the product's: (..., a) -> (..., b).
std::vector<std::int64_t> with_last(const Tensor& t, std::int64_t last) {
  std::vector<std::int64_t> shape = t.sizes().vec();
  shape.back() = last;
  return shape;
}

}  // namespace

Tensor blockwise_forward(const Tensor& x, const StoredTensor& w) {
  return forward_2d(x.reshape({-1, x.size(-1)}).contiguous(), w).view(with_last(x, w.rows()));
}

Tensor blockwise_input_grad(const Tensor& g, const StoredTensor& w, std::int64_t in_features) {
  return input_grad_2d(g.reshape({-1, g.size(-1)}).contiguous(), w, in_features).view(with_last(g, in_features));
}

}  // namespace tessera
