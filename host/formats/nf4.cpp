#include "formats/nf4.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace tessera {
namespace {

// (16) f32, index = code.
Tensor nf4_levels(c10::TensorOptions options) {
  // The 16 levels as bitsandbytes hard-codes them (QLoRA's quantiles of N(0, 1), scaled to [-1, 1]).
  static const float kLevels[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                                    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                                    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
                                    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
  return at::from_blob(const_cast<float*>(kLevels), {16}, at::kFloat).to(options.dtype(at::kFloat), false, true);
}

// (16) f32, index = code: bitsandbytes' FP4 (get_4bit_type("fp4"): 1 sign, 2 exponent, 1
// mantissa bits, bias 2) in code order — not ascending, with 0 twice — each divided by the
// largest, 12, in f32.
Tensor fp4_levels(c10::TensorOptions options) {
  static const float kLevels[16] = {0.0f, 0.0625f / 12, 8.0f / 12, 1.0f, 4.0f / 12, 6.0f / 12, 2.0f / 12, 3.0f / 12,
                                    0.0f, -0.0625f / 12, -8.0f / 12, -1.0f, -4.0f / 12, -6.0f / 12, -2.0f / 12, -3.0f / 12};
  return at::from_blob(const_cast<float*>(kLevels), {16}, at::kFloat).to(options.dtype(at::kFloat), false, true);
}

Tensor levels_of(const std::string& code, c10::TensorOptions options) {
  if (code == "nf4") return nf4_levels(options);
  if (code == "fp4") return fp4_levels(options);
  throw std::invalid_argument("4-bit code '" + code + "': not one (nf4, fp4)");
}

// (256) f32, ascending.
Tensor dynamic_map_signed(c10::TensorOptions options) {
  // For i = 0..6: the midpoints of linspace(0.1, 1, 2^i + 1) in f32, times ±10^(i−6); then
  // 0 and 1; 256 values sorted (bitsandbytes' create_dynamic_map(signed=True)).
  std::vector<float> v;
  for (int i = 0; i < 7; ++i) {
    Tensor b = at::linspace(0.1, 1.0, (1 << i) + 1, at::kFloat);
    Tensor mid = (b.narrow(0, 0, 1 << i) + b.narrow(0, 1, 1 << i)) / 2.0;
    const auto scale = static_cast<float>(std::pow(10.0, i - 6));  // the product rounds in f32, as torch's does
    for (std::int64_t k = 0; k < mid.size(0); ++k) {
      const float m = mid[k].item<float>();
      v.push_back(scale * m), v.push_back(-(scale * m));
    }
  }
  v.push_back(0.0f), v.push_back(1.0f);
  std::sort(v.begin(), v.end());
  return at::tensor(v, at::kFloat).to(options.dtype(at::kFloat));
}


// Index of the nearest of `levels` to each x; a midpoint goes to the lower level. Levels in
// another order (FP4's) are sorted first, equal ones by their index (a stable sort, as
// bitsandbytes' argsort of the table is on a CPU), and the index mapped back.
Tensor nearest(const Tensor& x, const Tensor& levels) {
  const auto n = levels.size(0);
  const auto [sorted, order] = at::sort(levels, /*stable=*/true, 0, false);
  Tensor mids = (sorted.narrow(0, 0, n - 1) + sorted.narrow(0, 1, n - 1)) / 2.0;  // f32
  return order.index_select(0, at::bucketize(x, mids, /*out_int32=*/false, /*right=*/false).reshape({-1})).view(x.sizes());
}

// Blocks of `blocksize` over the flat values, the last padded with zeros: (blocks, blocksize).
Tensor blocks_of(const Tensor& flat, std::int64_t blocksize) {
  const auto n = flat.numel(), nb = (n + blocksize - 1) / blocksize;
  return at::constant_pad_nd(flat, {0, nb * blocksize - n}).view({nb, blocksize});
}

}  // namespace

Nf4Parts nf4_quantize(const Tensor& w, std::int64_t blocksize, bool double_quant, const std::string& code) {
  Nf4Parts q;
  q.shape = w.sizes().vec(), q.blocksize = blocksize, q.double_quant = double_quant, q.code = code;
  const Tensor a = w.detach().reshape({-1}).to(at::kFloat);
  const auto n = a.numel();
  Tensor blocks = blocks_of(a, blocksize);
  Tensor absmax = blocks.abs().amax(1);  // (nb)
  // Full blocks scale by the reciprocal, a short last one divides (as bitsandbytes does:
  // the two can differ in the last bit, and so in a level at a midpoint).
  Tensor safe = absmax.clamp_min(1e-38);
  Tensor scaled = blocks * safe.reciprocal().unsqueeze(1);
  if (n % blocksize != 0) {
    scaled.select(0, -1).copy_(blocks.select(0, -1) / safe[-1]);
    absmax[-1] = safe[-1];
  }
  const Tensor levels = levels_of(code, a.options());
  Tensor codes = nearest(scaled.reshape({-1}).narrow(0, 0, n).clamp(-1, 1), levels);
  if (n % 2 != 0) codes = at::cat({codes, nearest(at::zeros({1}, a.options()), levels)});  // the pad: 0.0's code
  Tensor pairs = codes.view({-1, 2});
  q.packed = (pairs.select(1, 0) * 16 + pairs.select(1, 1)).to(at::kByte);
  if (!double_quant) {
    q.absmax = absmax;
    return q;
  }
  q.offset = absmax.mean().item<double>();
  Tensor centred = absmax - static_cast<float>(q.offset);
  Tensor nested = blocks_of(centred, 256);
  q.nested_absmax = nested.abs().amax(1);
  // An all-equal group (max |·| = 0) keeps code 0.0 instead of dividing 0 by 0.
  Tensor normed = at::where(q.nested_absmax.unsqueeze(1) > 0, nested / q.nested_absmax.unsqueeze(1), at::zeros_like(nested));
  q.absmax = nearest(normed.reshape({-1}).narrow(0, 0, absmax.numel()), dynamic_map_signed(a.options())).to(at::kByte);
  return q;
}

namespace {

// With the level tables at hand (on the parts' device, f32).
Tensor dequantize_with(const Nf4Parts& q, c10::TensorOptions options, const Tensor& levels, const Tensor& dyn) {
  std::int64_t n = 1;
  for (auto d : q.shape) n *= d;
  Tensor packed = q.packed.to(options.device());
  // Two codes a byte, the first in the high nibble; int32 indices (half the bytes of int64).
  Tensor codes = at::stack({at::bitwise_right_shift(packed, 4), at::bitwise_and(packed, 15)}, 1).reshape({-1}).narrow(0, 0, n).to(at::kInt);
  Tensor absmax = q.absmax.to(options.device());
  if (q.double_quant) {
    const auto nb = absmax.numel();
    Tensor scale = q.nested_absmax.to(options.device()).repeat_interleave(256).narrow(0, 0, nb);
    absmax = dyn.index_select(0, absmax.to(at::kInt)) * scale + static_cast<float>(q.offset);
  }
  Tensor values = blocks_of(levels.index_select(0, codes), q.blocksize) * absmax.unsqueeze(1);
  return values.reshape({-1}).narrow(0, 0, n).view(q.shape).to(options.dtype());
}

}  // namespace

Tensor nf4_dequantize(const Nf4Parts& q, c10::TensorOptions options) {
  const auto f32 = options.dtype(at::kFloat);
  return dequantize_with(q, options, levels_of(q.code, f32), q.double_quant ? dynamic_map_signed(f32) : Tensor());
}

namespace {

class Nf4Tensor final : public StoredTensor {
 public:
  // The tables are made once, on the weight's device: a product dequantizes without a
  // host round trip.
  Nf4Tensor(Nf4Parts q, c10::TensorOptions options)
      : q_(std::move(q)), options_(options), levels_(levels_of(q_.code, options.dtype(at::kFloat))),
        dyn_(q_.double_quant ? dynamic_map_signed(options.dtype(at::kFloat)) : Tensor()) {
    if (blockwise()) tables();
  }
  const char* format() const override { return q_.code == "fp4" ? "fp4" : "nf4"; }
  Tensor dense() const override { return dequantize_with(q_, options_, levels_, dyn_); }
  std::int64_t column_step() const override { return blockwise() ? q_.blocksize : 0; }
  std::int64_t rows() const override { return q_.shape.size() == 2 ? q_.shape[0] : 0; }
  // The values dense() has there, product for product: NF4[code] · absmax in f32, absmax
  // itself dyn[code] · nested + offset (two roundings, as torch's ops make them).
  void dequantize_row(std::int64_t r, std::int64_t c0, std::int64_t c1, float* out) const override {
    const std::int64_t cols = q_.shape[1], bs = q_.blocksize;
    const auto* packed = q_.packed.data_ptr<std::uint8_t>();
    for (std::int64_t c = c0; c < c1; c += bs) {
      const std::int64_t flat = r * cols + c, n = std::min(bs, c1 - c);
      const float scale = absmax(flat / bs);
      const std::uint8_t* p = packed + flat / 2;
      for (std::int64_t j = 0; j < n / 2; ++j, out += 2) {
        const float* pair = pairs_[p[j]];
        out[0] = pair[0] * scale, out[1] = pair[1] * scale;
      }
    }
  }
  std::int64_t stored_bytes() const override {
    auto bytes = [](const Tensor& t) { return t.defined() ? t.numel() * static_cast<std::int64_t>(t.element_size()) : 0; };
    return bytes(q_.packed) + bytes(q_.absmax) + bytes(q_.nested_absmax) + (q_.double_quant ? 4 : 0);
  }

 private:
  // Rows of whole blocks, two codes to a byte, on a CPU in f32.
  bool blockwise() const {
    return q_.shape.size() == 2 && q_.shape[1] % q_.blocksize == 0 && q_.blocksize % 2 == 0 && options_.device().is_cpu() &&
           c10::typeMetaToScalarType(options_.dtype()) == at::kFloat && q_.packed.is_cpu();
  }
  void tables() {
    const Tensor levels = levels_.contiguous();
    const float* l = levels.data_ptr<float>();
    for (int b = 0; b < 256; ++b) pairs_[b][0] = l[b >> 4], pairs_[b][1] = l[b & 15];  // high nibble first
    absmax_ = q_.absmax.contiguous();
    if (!q_.double_quant) return;
    nested_ = q_.nested_absmax.contiguous();
    const Tensor dyn = dyn_.contiguous();
    std::copy(dyn.data_ptr<float>(), dyn.data_ptr<float>() + 256, dyn_table_);
  }
  float absmax(std::int64_t block) const {
    if (!q_.double_quant) return absmax_.data_ptr<float>()[block];
    const float scaled = dyn_table_[absmax_.data_ptr<std::uint8_t>()[block]] * nested_.data_ptr<float>()[block / 256];
    return scaled + static_cast<float>(q_.offset);
  }

  Nf4Parts q_;
  c10::TensorOptions options_;  // of the dense value: the model's compute dtype and device
  Tensor levels_, dyn_;         // (16), (256) f32
  // For dequantize_row: a byte's two levels, and the block scales' tables, on the CPU.
  float pairs_[256][2] = {};
  float dyn_table_[256] = {};
  Tensor absmax_, nested_;
};

}  // namespace

std::unique_ptr<StoredTensor> nf4_storage(const Tensor& dense, std::int64_t blocksize, bool double_quant, const std::string& code) {
  return std::make_unique<Nf4Tensor>(nf4_quantize(dense, blocksize, double_quant, code), dense.options().requires_grad(false));
}

}  // namespace tessera
