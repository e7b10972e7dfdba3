#include "formats/int8.h"

#include <ATen/ATen.h>

#include <stdexcept>

namespace tessera {
namespace {

// 1/127 as bitsandbytes writes it (a double literal, rounded to f32 by the multiply).
constexpr double kInv127 = 7.874015718698502e-3;

}  // namespace

Int8Parts int8_quantize(const Tensor& w) {
  if (w.dim() != 2) throw std::invalid_argument("int8 storage keeps matrices by row, and this weight has " + std::to_string(w.dim()) + " dimensions");
  const Tensor a = w.detach().to(at::kFloat);
  Int8Parts q;
  q.scales = a.abs().amax(1);  // (out)
  // 127 · (1 / scale), as Python's 127.0 / t computes it in bitsandbytes (a reciprocal, then a
  // product: a true division rounds differently, and so does a code at a tie).
  const Tensor factor = at::where(q.scales > 0, q.scales.reciprocal() * 127.0, at::zeros_like(q.scales));
  q.codes = at::round(a * factor.unsqueeze(1)).to(at::kChar);
  return q;
}

Tensor int8_dequantize(const Int8Parts& q, c10::TensorOptions options) {
  const Tensor codes = q.codes.to(options.device()), scales = q.scales.to(options.device());
  return (codes.to(at::kFloat) * scales.unsqueeze(1) * kInv127).to(options.dtype());
}

namespace {

class Int8Rows final : public StoredTensor {
 public:
  Int8Rows(Int8Parts q, c10::TensorOptions options) : q_(std::move(q)), options_(options) {}
  const char* format() const override { return "int8"; }
  Tensor dense() const override { return int8_dequantize(q_, options_); }
  std::int64_t stored_bytes() const override { return q_.codes.numel() + q_.scales.numel() * 4; }
  std::int64_t column_step() const override {
    return options_.device().is_cpu() && c10::typeMetaToScalarType(options_.dtype()) == at::kFloat && q_.codes.is_cpu() ? 1 : 0;
  }
  std::int64_t rows() const override { return q_.codes.size(0); }
  void dequantize_row(std::int64_t r, std::int64_t c0, std::int64_t c1, float* out) const override {
    const std::int8_t* codes = q_.codes.data_ptr<std::int8_t>() + r * q_.codes.size(1);
    const float scale = q_.scales.data_ptr<float>()[r], inv = static_cast<float>(kInv127);
    for (std::int64_t c = c0; c < c1; ++c) *out++ = static_cast<float>(codes[c]) * scale * inv;
  }

 private:
  Int8Parts q_;
  c10::TensorOptions options_;
};

}  // namespace

std::unique_ptr<StoredTensor> int8_storage(const Tensor& dense) {
  return std::make_unique<Int8Rows>(int8_quantize(dense), dense.options().requires_grad(false));
}

}  // namespace tessera
