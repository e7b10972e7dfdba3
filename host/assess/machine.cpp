#include "assess/machine.h"

#include "train/trainer.h"

#include <tessera/fingerprint.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <fstream>
#include <string>

namespace tessera {
namespace {

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("model name", 0) == 0 && line.find(':') != std::string::npos) return line.substr(line.find(':') + 2);
  return "unknown processor";
}

// The best of several timed 1024² f32 products (after two untimed): the FLOP/s a dense
// product reaches here with these threads; what oneDNN/MKL give a model's own products.
double dense_peak() {
  constexpr std::int64_t n = 1024;
  const at::Tensor a = at::randn({n, n}), b = at::randn({n, n});
  at::Tensor c = at::empty({n, n});
  double best = 1e30;
  for (int i = 0; i < 12; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    at::mm_out(c, a, b);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (i >= 2) best = std::min(best, s);
  }
  return 2.0 * n * n * n / best;
}

}  // namespace

nlohmann::json machine_info(std::int64_t threads) {
  set_threads(threads);
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", std::gmtime(&now));
  return {{"cpu", cpu_model()}, {"threads", at::get_num_threads()}, {"torch", TESSERA_TORCH_VERSION}, {"tessera", TESSERA_VERSION},
          {"date", date}, {"peak_flops", dense_peak()}};
}

}  // namespace tessera
