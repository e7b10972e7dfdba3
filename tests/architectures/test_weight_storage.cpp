// The storage stage (architectures/weight_storage.h): [model] quantize_targets gives layer
// weights a format of their own over `quantize`, and a method's request wins over both.
#include "support.h"

#include "architectures/backbone.h"
#include "architectures/weight_storage.h"

#include <ATen/ATen.h>

using namespace tessera;

namespace {

std::map<std::string, std::string> storages(Backbone& b) {
  std::map<std::string, std::string> out;
  for (auto* l : b.sites().linear_sites()) out[l->name()] = l->weight().storage();
  return out;
}

}  // namespace

CATCH_TEST_CASE("quantize_targets: nf4 layers with int8 down projections and dense outputs, a method's request over both", "[nf4][int8][fp4]") {
  auto b = load_backbone(test::model_dir(), test::options());
  const std::vector<std::pair<std::string, std::string>> overrides = {{"mlp.down", "int8"}, {"attn.o", "none"}, {"layers.5.attn.q", "fp4"}};
  CATCH_CHECK(store_weights(b->sites(), "nf4", true, {{"layers.0.mlp.down", "nf4"}}, "", overrides) == 6 * 6 - 6);
  std::map<std::string, int> seen;
  for (const auto& [name, storage] : storages(*b)) {
    CATCH_INFO(name);
    ++seen[storage];
    if (name == "layers.0.mlp.down") CATCH_CHECK(storage == "nf4");  // the method's
    else if (name.find("mlp.down") != std::string::npos) CATCH_CHECK(storage == "int8");
    else if (name.find("attn.o") != std::string::npos || name.rfind("layers.", 0) != 0) CATCH_CHECK(storage == "dense");
    else if (name == "layers.5.attn.q") CATCH_CHECK(storage == "fp4");
    else CATCH_CHECK(storage == "nf4");
  }
  CATCH_CHECK(seen["int8"] == 5);
  CATCH_CHECK(seen["fp4"] == 1);
  // The model still computes: outputs near the dense model's (quantization loses a little).
  auto dense = load_backbone(test::model_dir(), test::options());
  const Tensor ids = at::tensor({101, 2023, 2143, 2001, 2307, 102}, at::kLong).view({1, -1}).to(test::device());
  const Tensor mask = at::ones_like(ids);
  at::NoGradGuard no_grad;
  const Tensor a = b->encode(ids, mask).hidden, d = dense->encode(ids, mask).hidden;
  CATCH_CHECK(test::max_abs_diff(a, d) > 1e-4);
  CATCH_CHECK(test::max_abs_diff(a, d) < 0.2 * d.abs().max().item<double>());
}

CATCH_TEST_CASE("quantize_targets that match nothing, or ask two formats of one weight, are refused naming them", "[nf4]") {
  auto b = load_backbone(test::model_dir(), test::options());
  CATCH_CHECK_THROWS_WITH(store_weights(b->sites(), "nf4", false, {}, "", {{"mlp.gate", "int8"}}),
                          Catch::Contains("quantize_targets: 'mlp.gate' matches no linear site of the model's layers"));
  auto c = load_backbone(test::model_dir(), test::options());
  CATCH_CHECK_THROWS_WITH(store_weights(c->sites(), "none", false, {}, "", {{"mlp.down", "int8"}, {"layers.1.mlp.down", "fp4"}}),
                          Catch::Contains("linear site layers.1.mlp.down matches") && Catch::Contains("(int8)") && Catch::Contains("(fp4)"));
}
