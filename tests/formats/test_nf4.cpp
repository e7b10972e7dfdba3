// NF4 storage (formats/nf4.h) against the plain-PyTorch rendering of bitsandbytes'
// layout in tests/fixtures/nf4_reference.py, and a real model stored as NF4 against
// transformers running the same model with its weights through the reference round trip.
#include "support.h"

#include "architectures/backbone.h"
#include "architectures/weight_storage.h"
#include "formats/nf4.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>

using namespace tessera;

namespace {

Nf4Parts reference_parts(const NamedTensors& f, int i, bool dq) {
  const std::string tag = std::to_string(i) + (dq ? ".dq" : ".plain");
  Nf4Parts q;
  q.packed = f.at("packed" + tag).cpu();
  q.absmax = f.at("absmax" + tag).cpu();
  if (dq) q.nested_absmax = f.at("nested" + tag).cpu(), q.offset = f.at("offset" + tag).item<double>();
  q.shape = f.at("w" + std::to_string(i)).sizes().vec();
  q.double_quant = dq;
  return q;
}

}  // namespace

CATCH_TEST_CASE("NF4 blocks: codes, scales and dequantized values equal the reference layout", "[nf4]") {
  const auto f = test::read_tensors(test::fixture("nf4/blocks.safetensors"), at::kCPU);
  for (int i = 0; i < 5; ++i) {
    const Tensor w = f.at("w" + std::to_string(i));
    CATCH_INFO("weight " << i << " " << w.sizes());
    // Without double quantization every byte and scale is the reference's.
    const Nf4Parts ours = nf4_quantize(w, 64, false);
    CATCH_CHECK(at::equal(ours.packed, f.at("packed" + std::to_string(i) + ".plain")));
    CATCH_CHECK(at::equal(ours.absmax, f.at("absmax" + std::to_string(i) + ".plain")));
    CATCH_CHECK(at::equal(nf4_dequantize(ours, at::kFloat), f.at("dequant" + std::to_string(i) + ".plain")));
    // The dequantizer alone, on the reference's parts.
    for (bool dq : {false, true})
      CATCH_CHECK(at::equal(nf4_dequantize(reference_parts(f, i, dq), at::kFloat), f.at("dequant" + std::to_string(i) + (dq ? ".dq" : ".plain"))));
    // Double quantization: the same packed codes and nested scales; the 8-bit codes of
    // the block scales may differ by one where a value sits on a midpoint within float
    // rounding (bitsandbytes' own CPU kernel differs from exact nearest there too).
    const Nf4Parts dq = nf4_quantize(w, 64, true);
    const Nf4Parts ref = reference_parts(f, i, true);
    CATCH_CHECK(at::equal(dq.packed, ref.packed));
    CATCH_CHECK(at::allclose(dq.nested_absmax, ref.nested_absmax, 1e-6, 0));
    CATCH_CHECK(std::abs(dq.offset - ref.offset) <= 1e-6 * std::abs(ref.offset));
    const Tensor code_diff = (dq.absmax.to(at::kInt) - ref.absmax.to(at::kInt)).abs();
    CATCH_CHECK(code_diff.max().item<int>() <= 1);
    CATCH_CHECK(code_diff.gt(0).sum().item<std::int64_t>() * 100 <= dq.absmax.numel());
    const double scale = w.abs().max().item<double>();
    CATCH_CHECK((nf4_dequantize(dq, at::kFloat) - f.at("dequant" + std::to_string(i) + ".dq")).abs().max().item<double>() <= 0.02 * scale);
  }
  // The quantization is not the identity: it must lose something (4 bits a value).
  const Tensor w = f.at("w2");
  const double err = (nf4_dequantize(nf4_quantize(w), at::kFloat) - w).abs().max().item<double>();
  CATCH_CHECK(err > 0);
  CATCH_CHECK(err < 0.2 * w.abs().max().item<double>());
}

CATCH_TEST_CASE("a model stored as NF4 equals transformers on the same NF4 round trip, at a seventh of the memory", "[nf4][minilm][parity]") {
  const auto ref = test::read_tensors(test::fixture("nf4/minilm.safetensors"));
  for (bool dq : {false, true}) {
    CATCH_INFO((dq ? "double quantization" : "plain NF4"));
    auto dense = load_backbone(test::model_dir(), test::options());
    auto nf4 = load_backbone(test::model_dir(), test::options());
    store_weights(nf4->sites(), "nf4", dq);
    std::size_t quantized = 0;
    std::int64_t dense_bytes = 0, nf4_bytes = 0;
    const auto sites = nf4->sites().linear_sites(), dense_sites = dense->sites().linear_sites();
    for (std::size_t k = 0; k < sites.size(); ++k) {
      const auto& stored = ParameterSiteImpl::of(sites[k]->weight());
      if (std::string(sites[k]->weight().storage()) != "nf4") continue;
      ++quantized;
      nf4_bytes += stored.stored_bytes();
      dense_bytes += ParameterSiteImpl::of(dense_sites[k]->weight()).stored_bytes();
    }
    CATCH_CHECK(quantized == 6 * 6);  // q, k, v, o, up, down of each of the 6 layers
    CATCH_CHECK(static_cast<double>(nf4_bytes) < (dq ? 0.13 : 0.145) * static_cast<double>(dense_bytes));
    test::perturb_if_asked(nf4->sites());
    at::NoGradGuard no_grad;
    const Tensor ours = nf4->encode(ref.at("input_ids"), ref.at("attention_mask")).hidden;
    TESSERA_CHECK_PARITY(test::parity(ours, ref, dq ? "nf4dq.hidden" : "nf4.hidden", ref.at("attention_mask")));
  }
}

CATCH_TEST_CASE("GPT-2 stored as NF4: q, k and v read their rows from the quantized c_attn, and a fold through one reaches it", "[nf4]") {
  auto gpt2 = load_backbone(test::fixture("decoders/gpt2"), test::options());
  store_weights(gpt2->sites(), "nf4", false);
  std::map<std::string, LinearSite*> sites;
  for (auto* l : gpt2->sites().linear_sites()) sites[l->name()] = l;
  auto& whole = ParameterSiteImpl::of(sites.at("layers.0.attn.qkv")->weight());
  CATCH_REQUIRE(std::string(sites.at("layers.0.attn.qkv")->weight().storage()) == "nf4");
  const auto H = sites.at("layers.0.attn.q")->out_features();
  for (const auto& [k, name] : std::vector<std::pair<int, std::string>>{{0, "q"}, {1, "k"}, {2, "v"}}) {
    auto& view = ParameterSiteImpl::of(sites.at("layers.0.attn." + name)->weight());
    CATCH_INFO(name);
    CATCH_CHECK(std::string(sites.at("layers.0.attn." + name)->weight().storage()) == "nf4");
    CATCH_CHECK(view.stored_bytes() == 0);
    CATCH_CHECK(at::equal(view.base_value(), whole.base_value().narrow(0, k * H, H)));
  }
  // A fold through q (a merge of a method on attn.q) makes c_attn dense and lands in its rows;
  // k still reads its rows from it.
  const Tensor before = whole.base_value();
  auto& q = sites.at("layers.0.attn.q")->weight();
  const Tensor d = at::full({H, sites.at("layers.0.attn.q")->in_features()}, 0.5, test::options());
  q.fold(d);
  CATCH_CHECK(std::string(sites.at("layers.0.attn.qkv")->weight().storage()) == "dense");
  CATCH_CHECK(at::allclose(whole.base_value().narrow(0, 0, H), before.narrow(0, 0, H) + 0.5));
  CATCH_CHECK(at::equal(whole.base_value().narrow(0, H, 2 * H), before.narrow(0, H, 2 * H)));
  CATCH_CHECK(at::equal(ParameterSiteImpl::of(q).base_value(), whole.base_value().narrow(0, 0, H)));
  CATCH_CHECK(at::equal(ParameterSiteImpl::of(sites.at("layers.0.attn.k")->weight()).base_value(), whole.base_value().narrow(0, H, H)));
}

CATCH_TEST_CASE("training through an NF4 weight keeps no dense weight for backward, and its input gradient is the dense one's", "[nf4]") {
  auto bert = load_backbone(test::model_dir(), test::options());
  store_weights(bert->sites(), "nf4", true);
  LinearSiteImpl* up = nullptr;
  for (auto* l : bert->sites().linear_sites())
    if (l->name() == "layers.0.mlp.up") up = &LinearSiteImpl::of(*l);
  CATCH_REQUIRE(up != nullptr);
  const Tensor w = ParameterSiteImpl::of(up->weight()).base_value();  // the dequantized weight
  const Tensor b = up->bias()->value();
  const Tensor x = at::randn({3, 5, w.size(1)}, test::options()).set_requires_grad(true);
  const Tensor g = at::randn({3, 5, w.size(0)}, test::options());
  Tensor y = up->forward(x);
  CATCH_CHECK_THAT(y.grad_fn()->name(), Catch::Contains("RecomputedProduct"));  // saves only what recomputes the weight
  (y * g).sum().backward();
  const Tensor x2 = x.detach().clone().set_requires_grad(true);
  Tensor y2 = at::linear(x2, w, b);
  (y2 * g).sum().backward();
  CATCH_CHECK(at::allclose(y, y2, 1e-5, 1e-5));
  CATCH_CHECK(at::allclose(x.grad(), x2.grad(), 1e-5, 1e-5));
  CATCH_CHECK_FALSE(ParameterSiteImpl::of(up->weight()).has_dense_copy());
}

CATCH_TEST_CASE("a quantized T5 keeps wo dense as transformers does in 4 bits, unless a method asks for it", "[nf4]") {
  auto t5 = load_backbone(test::fixture("seq2seq/t5"), test::options());
  store_weights(t5->sites(), "nf4", false, {{"decoder.layers.0.mlp.down", "nf4"}});
  std::size_t dense = 0, nf4 = 0;
  for (auto* l : t5->sites().linear_sites()) {
    const std::string storage = l->weight().storage();
    CATCH_INFO(l->name());
    if (l->name() == "decoder.layers.0.mlp.down") CATCH_CHECK(storage == "nf4");  // asked for
    else if (l->name().find("mlp.down") != std::string::npos || l->name() == "head") CATCH_CHECK(storage == "dense");
    else CATCH_CHECK(storage == "nf4");
    (storage == "nf4" ? nf4 : dense) += 1;
  }
  CATCH_CHECK(nf4 > dense);
}

// Codes and scales are bitsandbytes' own; dequantized values its published FP4 code book
// applied to them (tests/fixtures/make_nf4.py: its CPU dequantize_4bit strays from that book on
// some machines, and the fixture says so).
CATCH_TEST_CASE("FP4 blocks: codes, scales and dequantized values are bitsandbytes' own, with and without double quantization", "[nf4][fp4]") {
  const auto f = test::read_tensors(test::fixture("nf4/blocks.safetensors"), at::kCPU);
  const auto bnb = test::read_tensors(test::fixture("nf4/bnb_blocks.safetensors"), at::kCPU);
  for (int i = 0; i < 5; ++i) {
    const Tensor w = f.at("w" + std::to_string(i));
    const std::string tag = std::to_string(i);
    CATCH_INFO("weight " << i << " " << w.sizes());
    const Nf4Parts plain = nf4_quantize(w, 64, false, "fp4");
    CATCH_CHECK(at::equal(plain.packed, bnb.at("fp4.packed" + tag + ".plain")));
    CATCH_CHECK(at::equal(plain.absmax, bnb.at("fp4.absmax" + tag + ".plain")));
    CATCH_CHECK(at::equal(nf4_dequantize(plain, at::kFloat), bnb.at("fp4.dequant" + tag + ".plain")));
    // Double quantization: bitsandbytes' CPU kernel rounds a block scale's 8-bit code as the
    // NF4 case above says (at most one step, rarely); the 4-bit codes are its own.
    const Nf4Parts dq = nf4_quantize(w, 64, true, "fp4");
    CATCH_CHECK(at::equal(dq.packed, bnb.at("fp4.packed" + tag + ".dq")));
    CATCH_CHECK(at::allclose(dq.nested_absmax, bnb.at("fp4.nested" + tag + ".dq"), 1e-6, 0));
    const Tensor code_diff = (dq.absmax.to(at::kInt) - bnb.at("fp4.absmax" + tag + ".dq").to(at::kInt)).abs();
    CATCH_CHECK(code_diff.max().item<int>() <= 1);
    CATCH_CHECK(code_diff.gt(0).sum().item<std::int64_t>() * 100 <= dq.absmax.numel());
    CATCH_CHECK((nf4_dequantize(dq, at::kFloat) - bnb.at("fp4.dequant" + tag + ".dq")).abs().max().item<double>() <= 0.02 * w.abs().max().item<double>());
    // FP4 is not NF4: another table, other codes.
    CATCH_CHECK(!at::equal(plain.packed, nf4_quantize(w, 64, false).packed));
  }
  // Stored as FP4, a product runs slab by slab on the same values.
  const auto stored = nf4_storage(f.at("w2"), 64, true, "fp4");
  CATCH_CHECK(std::string(stored->format()) == "fp4");
  CATCH_CHECK(stored->column_step() == 64);
  std::vector<float> row(384);
  stored->dequantize_row(5, 0, 384, row.data());
  CATCH_CHECK(at::equal(at::from_blob(row.data(), {384}, at::kFloat), stored->dense()[5]));
}
