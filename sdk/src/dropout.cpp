// tessera::dropout — see tessera/dropout.h for why the CPU draws its mask this way.
#include <tessera/dropout.h>

#include <tessera/internal/dropout_mask.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace tessera {
namespace {

constexpr std::int64_t kBlock = 1 << 16;  // draws per generator: the mask's layout, fixed
constexpr double kLevels = 32768.0;       // 2^15: the resolution of a draw

// The CPU loops here are plain loops over restrict pointers that the compiler vectorises —
// for AVX2 where the CPU has it (GCC's target_clones: one copy per target, picked when the
// library loads; the build's baseline is x86-64's SSE2).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define TESSERA_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TESSERA_VECTOR_CLONES
#endif

// One block's keep flags: SplitMix64 (Steele, Lea & Flood 2014) from `seed`, each 64-bit
// output read as four 15-bit draws (its 16-bit lanes, top bits cleared); draw ≥ t keeps.
// SplitMix64's j-th output is a function of seed + j·γ alone, so the loop has no carried
// state and vectorises. count: the block's length (a multiple of 4 but in the last block).
TESSERA_VECTOR_CLONES void draw_block(std::uint64_t seed, std::uint16_t t, std::uint8_t* __restrict out, std::int64_t count) {
  auto mix = [seed](std::uint64_t j) {
    std::uint64_t z = seed + (j + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  };
  const std::int64_t words = count / 4;
  for (std::int64_t j = 0; j < words; ++j) {
    const std::uint64_t v = mix(static_cast<std::uint64_t>(j));
    for (int k = 0; k < 4; ++k) out[4 * j + k] = static_cast<std::uint8_t>(((v >> (16 * k)) & 0x7FFF) >= t);
  }
  const std::uint64_t v = mix(static_cast<std::uint64_t>(words));
  for (std::int64_t k = 0; k < count % 4; ++k) out[4 * words + k] = static_cast<std::uint8_t>(((v >> (16 * k)) & 0x7FFF) >= t);
}

}  // namespace

namespace internal {

double rounded_dropout(double p) { return std::round(p * kLevels) / kLevels; }

// Block by block in parallel, each block's draws from a seed taken from the default
// generator (draw_block). One pass that writes the flags and nothing else.
at::Tensor draw_keep(std::int64_t n, double p) {
  const auto t = static_cast<std::uint16_t>(std::round(p * kLevels));
  const std::int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<std::uint64_t> seeds(static_cast<std::size_t>(blocks));
  {
    auto main = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(main.mutex());
    auto* gen = at::check_generator<at::CPUGeneratorImpl>(main);
    for (auto& s : seeds) s = gen->random64();
  }
  at::Tensor keep = at::empty({n}, at::TensorOptions().dtype(at::kBool));  // (n)
  auto* out = reinterpret_cast<std::uint8_t*>(keep.data_ptr<bool>());     // written as 0 or 1
  at::parallel_for(0, blocks, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t b = begin; b < end; ++b) draw_block(seeds[static_cast<std::size_t>(b)], t, out + b * kBlock, std::min(kBlock, n - b * kBlock));
  });
  return keep;
}

// The float32 CPU loops, the select written as a product with the mask's 0 or 1 (a bool
// operand does not vectorise); chunks of 2^15 elements.
namespace {

TESSERA_VECTOR_CLONES void scale_kept(const float* __restrict in, const std::uint8_t* __restrict keep, float c, float* __restrict out, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) out[i] = in[i] * (c * static_cast<float>(keep[i]));
}

TESSERA_VECTOR_CLONES void add_kept(const float* __restrict in, const std::uint8_t* __restrict keep, float* __restrict acc, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) acc[i] += in[i] * static_cast<float>(keep[i]);
}

bool fast_path(const at::Tensor& x) { return x.device().is_cpu() && x.scalar_type() == at::kFloat; }

}  // namespace

at::Tensor masked_scale(const at::Tensor& x, const at::Tensor& keep, double c) {
  if (!fast_path(x)) return x * keep.to(x.scalar_type()) * c;
  const at::Tensor xc = x.contiguous(), kc = keep.contiguous();
  at::Tensor y = at::empty(x.sizes(), xc.options());
  const float* in = xc.data_ptr<float>();
  const auto* k = reinterpret_cast<const std::uint8_t*>(kc.data_ptr<bool>());  // 0 or 1: a bool operand does not vectorise
  float* out = y.data_ptr<float>();
  at::parallel_for(0, x.numel(), 1 << 15, [&](std::int64_t b, std::int64_t e) { scale_kept(in + b, k + b, static_cast<float>(c), out + b, e - b); });
  return y;
}

void masked_add_(at::Tensor& acc, const at::Tensor& t, const at::Tensor& keep) {
  if (!fast_path(acc) || !acc.is_contiguous()) {
    acc.add_(t * keep.to(t.scalar_type()));
    return;
  }
  const at::Tensor tc = t.contiguous(), kc = keep.contiguous();
  const float* in = tc.data_ptr<float>();
  const auto* k = reinterpret_cast<const std::uint8_t*>(kc.data_ptr<bool>());  // 0 or 1: a bool operand does not vectorise
  float* out = acc.data_ptr<float>();
  at::parallel_for(0, acc.numel(), 1 << 15, [&](std::int64_t b, std::int64_t e) { add_kept(in + b, k + b, out + b, e - b); });
}

}  // namespace internal

namespace {

// y = x ∘ keep · c with the mask (1 byte an element) as all the backward keeps: ∂x = ∂y ∘ keep · c.
struct Dropout : torch::autograd::Function<Dropout> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, double p, double c) {
    const at::Tensor keep = internal::draw_keep(x.numel(), p).view(x.sizes());  // (x's shape), bool
    ctx->save_for_backward({keep});
    ctx->saved_data["c"] = c;
    return internal::masked_scale(x, keep, c);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad) {
    return {internal::masked_scale(grad[0], ctx->get_saved_variables()[0], ctx->saved_data["c"].toDouble()), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor dropout(const at::Tensor& x, double p, bool training) {
  if (!(p >= 0.0 && p <= 1.0)) throw std::invalid_argument("dropout probability must lie in [0, 1], got " + std::to_string(p));
  if (!training || p == 0.0 || x.numel() == 0) return x;
  if (p == 1.0) return x * 0;  // nothing kept; still a function of x for autograd
  if (!x.device().is_cpu()) return at::dropout(x, p, true);
  // Keep with probability 1 − p', p' = p rounded to 2^-15, and scale by 1/(1 − p').
  const double used = internal::rounded_dropout(p);
  if (used == 0.0) return x;
  if (used == 1.0) return x * 0;
  // x ∘ keep / (1 − p'), in one pass each way, the mask the only thing kept.
  const double c = 1.0 / (1.0 - used);
  if (at::GradMode::is_enabled() && x.requires_grad()) return Dropout::apply(x, p, c);
  return internal::masked_scale(x, internal::draw_keep(x.numel(), p).view(x.sizes()), c);
}

}  // namespace tessera
