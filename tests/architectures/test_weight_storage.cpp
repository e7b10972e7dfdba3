// The storage stage (architectures/weight_storage.h): [model] quantize_targets gives layer
// weights a format of their own over `quantize`, and a method's request wins over both.
#include "support.h"

#include "architectures/backbone.h"
#include "architectures/weight_storage.h"

#include <tessera/internal/sites_impl.h>

#include <ATen/ATen.h>

#include <functional>

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

namespace {

// Folds a delta into one stored weight of `b` (a merge) and checks that it turns dense as
// its dequantized value plus the delta, and that the model computes what a dense model with
// those weights computes (`with_dense`: the same model loaded dense, given every weight of `b`
// as `b` dequantizes it, then the same delta).
void check_fold(Backbone& b, Backbone& with_dense, const std::string& site, const std::string& format, const std::function<Tensor(Backbone&)>& out) {
  CATCH_INFO(format << " at " << site);
  LinearSite* l = nullptr;
  for (auto* s : b.sites().linear_sites())
    if (s->name() == site) l = s;
  CATCH_REQUIRE(l != nullptr);
  CATCH_REQUIRE(std::string(l->weight().storage()) == format);
  at::NoGradGuard no_grad;
  const auto& ours = b.sites().linear_sites();
  for (std::size_t i = 0; i < ours.size(); ++i) {
    auto& w = with_dense.sites().linear_sites()[i]->weight();
    w.fold(ParameterSiteImpl::of(ours[i]->weight()).base_value() - w.base());
  }
  const Tensor before = ParameterSiteImpl::of(l->weight()).base_value();
  const Tensor d = 0.01 * at::randn(before.sizes(), at::TensorOptions().dtype(at::kFloat).device(before.device()));
  l->weight().fold(d);
  CATCH_CHECK(std::string(l->weight().storage()) == "dense");
  CATCH_CHECK(at::equal(l->weight().base(), before + d));  // not rounded to the format again
  for (auto* s : with_dense.sites().linear_sites())
    if (s->name() == site) s->weight().fold(l->weight().base() - s->weight().base());
  CATCH_CHECK(test::max_abs_diff(out(b), out(with_dense)) <= 1e-4 * out(with_dense).abs().max().item<double>());  // products round apart
}

}  // namespace

CATCH_TEST_CASE("a merge into a weight kept as nf4, fp4 or int8 folds into its dequantized value, and the model computes it", "[nf4][int8][fp4]") {
  const Tensor ids = at::tensor({101, 2023, 2143, 2001, 2307, 102}, at::kLong).view({1, -1}).to(test::device());
  const Tensor mask = at::ones_like(ids);
  auto out = [&](Backbone& m) { return m.encode(ids, mask).hidden; };
  for (const std::string format : {"nf4", "fp4", "int8"}) {
    auto b = load_backbone(test::model_dir(), test::options());
    store_weights(b->sites(), format, true);
    auto dense = load_backbone(test::model_dir(), test::options());
    at::manual_seed(3);
    check_fold(*b, *dense, "layers.2.attn.v", format, out);
    check_fold(*b, *dense, "layers.4.mlp.down", format, out);
  }
}

CATCH_TEST_CASE("a merge into SmolLM2's GGUF blocks (Q4_1, streamed) folds into their dequantized value", "[formats][gguf][real]") {
  const char* path = std::getenv("TESSERA_DECODER_GGUF");
  CATCH_REQUIRE(path != nullptr);
  auto b = load_backbone(path, test::options(), true);
  store_weights(b->sites(), "gguf", false, {}, path);
  auto dense = load_backbone(path, test::options());
  const Tensor ids = at::tensor({1, 504, 3156, 314, 260, 1345, 28}, at::kLong).view({1, -1}).to(test::device());
  const Tensor mask = at::ones_like(ids);
  at::manual_seed(3);
  check_fold(*b, *dense, "layers.3.attn.q", "gguf", [&](Backbone& m) { return m.lm_states(ids, mask, {}); });
}
