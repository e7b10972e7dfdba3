// What CoDA's routing saves at evaluation: no-grad forward passes of the real encoder with
// the coda plugin at k = 1 (every token through every layer: the same model without
// routing, parallel adapters included) against k = 0.25 and k = 0.5 (each layer runs on that
// share of each row's tokens, gathered). Prints one JSON line: seconds per pass, best of N.
//   tessera_bench_coda MODEL_DIR PLUGIN_DIR BATCH LENGTH ITERATIONS THREADS
#include "architectures/bert.h"
#include "runtime/plugin_registry.h"
#include "train/trainer.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <iostream>

using namespace tessera;

int main(int argc, char** argv) {
  if (argc != 7) {
    std::cerr << "usage: tessera_bench_coda MODEL_DIR PLUGIN_DIR BATCH LENGTH ITERATIONS THREADS\n";
    return 2;
  }
  const std::int64_t B = std::stoll(argv[3]), T = std::stoll(argv[4]), iters = std::stoll(argv[5]);
  set_threads(std::stoll(argv[6]));
  PluginRegistry registry;
  registry.scan({argv[2]});
  auto model = BertModel::load(argv[1], at::TensorOptions());
  at::manual_seed(0);
  const at::Tensor ids = at::randint(1000, 20000, {B, T}, at::kLong), mask = at::ones({B, T}, at::kLong);
  nlohmann::json out = {{"batch", B}, {"length", T}, {"layers", model->layer_sites().size()}};
  for (const double k : {1.0, 0.5, 0.25}) {
    auto coda = registry.create("coda", "coda");
    coda->attach(*model, {}, apply_schema(registry.find("coda")->params, {{"k", k}}));
    c10::InferenceMode inference;
    model->forward(ids, mask);  // warm-up
    double best = 1e30;
    for (std::int64_t i = 0; i < iters; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      model->forward(ids, mask);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    out["seconds_k" + std::to_string(static_cast<int>(k * 100))] = best;
    coda->detach(*model);
  }
  out["speedup_k25"] = out["seconds_k100"].get<double>() / out["seconds_k25"].get<double>();
  out["speedup_k50"] = out["seconds_k100"].get<double>() / out["seconds_k50"].get<double>();
  std::cout << out.dump() << "\n";
}
