// tessera::dropout — see tessera/dropout.h for why the CPU draws its mask this way.
#include <tessera/dropout.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace tessera {
namespace {

constexpr std::int64_t kBlock = 1 << 16;  // draws per generator: the mask's layout, fixed
constexpr double kLevels = 32768.0;       // 2^15: the resolution of a draw

// n draws, each uniform over {0, …, 2^15 − 1} (int16), block by block in parallel: a random
// int64 holds 63 random bits, read as four 16-bit lanes with their top bit cleared.
at::Tensor draws(std::int64_t n) {
  const std::int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<std::uint64_t> seeds(static_cast<std::size_t>(blocks));
  {
    auto main = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(main.mutex());
    auto* gen = at::check_generator<at::CPUGeneratorImpl>(main);
    for (auto& s : seeds) s = gen->random64();
  }
  at::Tensor bits = at::empty({blocks * kBlock / 4}, at::TensorOptions().dtype(at::kLong));  // (blocks · 2^14)
  at::parallel_for(0, blocks, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t b = begin; b < end; ++b) {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(seeds[static_cast<std::size_t>(b)]);
      bits.narrow(0, b * kBlock / 4, kBlock / 4).random_(gen);  // [0, 2^63 − 1]
    }
  });
  return bits.view(at::kShort).narrow(0, 0, n).bitwise_and(0x7FFF);  // (n) int16
}

}  // namespace

at::Tensor dropout(const at::Tensor& x, double p, bool training) {
  if (!(p >= 0.0 && p <= 1.0)) throw std::invalid_argument("dropout probability must lie in [0, 1], got " + std::to_string(p));
  if (!training || p == 0.0 || x.numel() == 0) return x;
  if (p == 1.0) return x * 0;  // nothing kept; still a function of x for autograd
  if (!x.device().is_cpu()) return at::dropout(x, p, true);
  // Keep where the draw ≥ t: probability 1 − t/2^15, with t/2^15 the p used (and scaled by).
  const double t = std::round(p * kLevels);
  if (t == 0.0) return x;
  if (t == kLevels) return x * 0;
  const at::Tensor keep = at::ge(draws(x.numel()), static_cast<std::int64_t>(t)).view(x.sizes());  // (x's shape), bool
  // x ∘ keep / (1 − t/2^15): the product records only `keep` for its backward; the scaling is
  // in place on the product's own output.
  return x.mul(keep).mul_(1.0 / (1.0 - t / kLevels));
}

}  // namespace tessera
