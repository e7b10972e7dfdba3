// CoDA against a plain PyTorch rendering of its equations (tests/fixtures/make_coda.py):
// the same routers and adapters on the real MiniLM give the same hidden states, only
// ceil(k n) tokens per sequence run each frozen layer, and gradients reach the router.
#include "support.h"

#include "architectures/decoder.h"
#include "runtime/method_stack.h"

#include <fstream>

using namespace tessera;

namespace {

std::unique_ptr<MethodInstance> attach_coda(ModelView& model, std::map<std::string, ParamValue> params = {{"bottleneck_size", std::int64_t{16}}}) {
  auto inst = test::registry().create("coda", "coda");
  inst->attach(model, {}, apply_schema(test::registry().find("coda")->params, std::move(params)));
  return inst;
}

}  // namespace

CATCH_TEST_CASE("CoDA equals the reference rendering on MiniLM: soft top-k routers, k tokens through each frozen layer, adapters on all", "[plugins][coda][minilm][parity]") {
  auto model = test::load_minilm();
  auto coda = attach_coda(*model);
  coda->call("load_state", [](Method& m) { m.load_state(test::read_tensors(test::fixture("coda/adapter_model.safetensors"))); });
  auto& base = test::cached_tensors(test::fixture("reference.safetensors"));
  const auto &ids = base["input_ids"], &mask = base["attention_mask"];
  at::NoGradGuard no_grad;
  TESSERA_CHECK_PARITY(test::parity(model->forward(ids, mask).hidden, test::cached_tensors(test::fixture("coda/reference.safetensors")), "out", mask));
}

CATCH_TEST_CASE("CoDA's router sends ceil(k n) of each sequence's real tokens through a layer and gradients reach router and adapter", "[plugins][coda][minilm]") {
  auto model = test::load_minilm();
  auto coda = attach_coda(*model);  // the adapter's up projection starts at zero: layer 0 changes only the routed tokens
  auto& base = test::cached_tensors(test::fixture("reference.safetensors"));
  const auto &ids = base["input_ids"], &mask = base["attention_mask"];
  Tensor x0, y0;  // what layer 0 reads and what it gives
  model->embedding_site()->add_tap(test::owner("taps"), [&](const Tensor& x) { x0 = x; });
  model->match_layers({"layers.0"}).at(0)->add_tap(test::owner("taps"), [&](const Tensor& y) { y0 = y; });
  {
    at::NoGradGuard no_grad;
    model->forward(ids, mask);
  }
  const Tensor changed = (y0 - x0).abs().amax(-1).gt(0).logical_and(mask.to(at::kBool));  // (B, T)
  for (std::int64_t b = 0; b < ids.size(0); ++b) {
    const auto n = mask[b].sum().item<std::int64_t>();
    CATCH_CHECK(changed[b].sum().item<std::int64_t>() == (n + 3) / 4);  // k = 0.25
  }
  model->train(true);
  model->forward(ids, mask).hidden.sum().backward();
  for (const auto& [k, t] : coda->call("trainable", [](Method& m) { return m.trainable(); })) {
    CATCH_INFO("tensor " << k);
    if (k.find("adapter_down") != std::string::npos) continue;  // behind a zero up projection: no gradient yet
    CATCH_CHECK((t.grad().defined() && t.grad().abs().sum().item<double>() > 0));
  }
}

CATCH_TEST_CASE("CoDA refuses a share k outside 0 to 1 with the key's place, a decoder, and a foreign tensor by name", "[plugins][coda][minilm]") {
  auto refusal = [](const std::string& k) {
    const auto dir = test::temp_dir("coda-cfg");
    const auto path = (dir / "run.toml").string();
    std::ofstream(path) << "[model]\npath = \"/m\"\n[data]\npath = \"/d.csv\"\n[[methods]]\nplugin = \"coda\"\n[methods.params]\nk = " << k << "\n";
    try {
      Config c = load_config(path);
      check_methods(c, test::registry());
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string("(accepted)");
  };
  CATCH_CHECK_THAT(refusal("0.0"), Catch::Contains("run.toml:8:"));
  CATCH_CHECK_THAT(refusal("1.5"), Catch::Contains("run.toml:8:"));
  CATCH_CHECK(refusal("1.0") == "(accepted)");
  auto gpt2 = DecoderModel::load(test::fixture("decoders/gpt2"), test::options());
  CATCH_CHECK_THROWS_WITH(attach_coda(*gpt2), Catch::Contains("CoDA routes encoder layers (bert, roberta, t5's encoder), not a gpt2 model's"));
  auto model = test::load_minilm();
  auto coda = attach_coda(*model);
  auto s = coda->call("state", [](Method& m) { return m.state(); });
  s["encoder.layer.0.coda.adapter_up.weight"] = at::zeros({384, 8});
  CATCH_CHECK_THROWS_WITH(coda->call("load_state", [&](Method& m) { m.load_state(s); }),
                          Catch::Contains("tensor 'encoder.layer.0.coda.adapter_up.weight' has shape [384, 8], expected [384, 16]"));
}
