// What token routing saves: no-grad forward passes of an encoder whose every layer keeps a
// fraction of each row's tokens (the first ones, by a router installed on every layer site),
// against the same passes without routers. The kept tokens are gathered and the layer runs
// on them alone, so a layer at 25% should cost about a quarter. Prints one JSON line.
//   tessera_bench_routing MODEL_DIR BATCH LENGTH ITERATIONS THREADS
#include "architectures/bert.h"
#include "train/trainer.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <iostream>

using namespace tessera;

int main(int argc, char** argv) {
  if (argc != 6) {
    std::cerr << "usage: tessera_bench_routing MODEL_DIR BATCH LENGTH ITERATIONS THREADS\n";
    return 2;
  }
  const std::int64_t B = std::stoll(argv[2]), T = std::stoll(argv[3]), iters = std::stoll(argv[4]);
  set_threads(std::stoll(argv[5]));
  auto model = BertModel::load(argv[1], at::TensorOptions());
  at::manual_seed(0);
  const at::Tensor ids = at::randint(1000, 20000, {B, T}, at::kLong), mask = at::ones({B, T}, at::kLong);
  c10::InferenceMode inference;
  auto seconds = [&] {  // per pass, best of `iters` after one warm-up
    model->forward(ids, mask);
    double best = 1e30;
    for (std::int64_t i = 0; i < iters; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      model->forward(ids, mask);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return best;
  };
  nlohmann::json out = {{"batch", B}, {"length", T}, {"layers", model->layer_sites().size()}};
  const double none = seconds();
  out["no_router_ms"] = none * 1e3;
  for (double fraction : {1.0, 0.5, 0.25}) {
    auto owner = OwnerImpl::create("bench", "router");
    const auto keep = static_cast<std::int64_t>(fraction * static_cast<double>(T) + 0.5);
    for (auto* l : model->layer_sites())
      l->add_router(*owner, [keep](const at::Tensor& h) {  // (B, T, H) -> (B, T): the first `keep` tokens
        return (at::arange(h.size(1), h.options().dtype(at::kLong)) < keep).to(h.scalar_type()).expand({h.size(0), h.size(1)});
      });
    const double t = seconds();
    const std::string key = "kept_" + std::to_string(static_cast<int>(fraction * 100));
    out[key + "_ms"] = t * 1e3;
    out[key + "_ratio"] = t / none;
    owner->remove_all();
  }
  std::cout << out.dump() << "\n";
  return 0;
}
