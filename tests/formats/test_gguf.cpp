// The GGUF reader against the `gguf` package, llama.cpp's own Python reference for the
// format (tests/fixtures/make_gguf.py): metadata of every value type, and every tensor type
// read here dequantized bit for bit as the package dequantizes it; spoiled files refused
// naming the tensor.
#include "support.h"

#include "architectures/backbone.h"
#include "architectures/weight_storage.h"
#include "formats/gguf.h"
#include "formats/gguf_llama.h"
#include "formats/safetensors.h"

#include <unistd.h>

#include <cstdio>
#include <fstream>

using namespace tessera;

namespace {
std::string gguf(const std::string& name) { return test::fixture("gguf/" + name); }

// The resident KiB of this process's mapping that holds `address` (/proc/self/smaps), or -1.
long mapping_rss_kib(const void* address) {
  std::ifstream smaps("/proc/self/smaps");
  const auto at = reinterpret_cast<std::uintptr_t>(address);
  bool inside = false;
  for (std::string line; std::getline(smaps, line);) {
    unsigned long begin = 0, end = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &begin, &end) == 2 && line.find(':') > line.find(' ')) inside = begin <= at && at < end;
    long kib = 0;
    if (inside && std::sscanf(line.c_str(), "Rss: %ld kB", &kib) == 1) return kib;
  }
  return -1;
}
}  // namespace

CATCH_TEST_CASE("a GGUF file's metadata and tensors read as the gguf package reads them, F32 to Q8_0 bit for bit", "[formats][gguf]") {
  auto f = GgufFile::open(gguf("tensors.gguf"));
  CATCH_CHECK(f->version() == 3);
  const auto meta = nlohmann::json::parse(std::ifstream(gguf("metadata.json")));
  for (auto it = meta.begin(); it != meta.end(); ++it) {
    CATCH_INFO(it.key());
    CATCH_REQUIRE(f->metadata().contains(it.key()));
    if (it.value().is_array() && it.value()[0].is_number_float()) {
      for (std::size_t i = 0; i < it.value().size(); ++i) CATCH_CHECK(f->metadata()[it.key()][i].get<double>() == it.value()[i].get<double>());
    } else {
      CATCH_CHECK(f->metadata()[it.key()] == it.value());
    }
  }
  CATCH_CHECK(f->metadata()["general.architecture"] == "llama");
  const auto expected = test::read_tensors(gguf("expected.safetensors"));
  CATCH_CHECK(f->tensors().size() == expected.size());
  std::set<std::string> types;
  for (const auto& t : f->tensors()) {
    CATCH_INFO(t.name);
    types.insert(GgufFile::type_name(t.type));
    const at::Tensor x = f->dequantize(t.name);
    CATCH_CHECK(x.sizes() == expected.at(t.name).sizes());
    CATCH_CHECK(x.scalar_type() == at::kFloat);
    CATCH_CHECK(at::equal(x, expected.at(t.name)));
  }
  CATCH_CHECK(types == std::set<std::string>{"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"});
  CATCH_CHECK_THROWS_WITH(f->dequantize("missing"), Catch::Contains("tensor 'missing': is not in the file"));
}

CATCH_TEST_CASE("a spoiled GGUF file is refused naming the tensor: cut short, an unknown type, an offset past the end", "[formats][gguf]") {
  CATCH_CHECK_THROWS_WITH(GgufFile::open(gguf("truncated.gguf")), Catch::Contains("tensor 'stack.q8_0': its 408 bytes") && Catch::Contains("truncated or corrupt"));
  CATCH_CHECK_THROWS_WITH(GgufFile::open(gguf("unknown_type.gguf")), Catch::Contains("tensor 'blocks.q4_1': has ggml type 250, which is not one read here"));
  CATCH_CHECK_THROWS_WITH(GgufFile::open(gguf("bad_offset.gguf")), Catch::Contains("tensor 'blocks.q8_0'") && Catch::Contains("leave the file"));
  CATCH_CHECK_THROWS_WITH(GgufFile::open(gguf("huge_extents.gguf")), Catch::Contains("tensor 'stack.q8_0': has more than 2^50 elements"));
  CATCH_CHECK_THROWS_WITH(GgufFile::open(gguf("expected.safetensors")), Catch::Contains("not a GGUF file"));
  CATCH_CHECK_THROWS_WITH(GgufFile::open(gguf("absent.gguf")), Catch::Contains("cannot open"));
  // A header cut inside the metadata: the key being read is what runs past the end.
  const auto cut = test::temp_dir("gguf-cut") / "cut.gguf";
  {
    std::ifstream in(gguf("tensors.gguf"), std::ios::binary);
    std::string bytes(std::istreambuf_iterator<char>(in), {});
    std::ofstream(cut, std::ios::binary) << bytes.substr(0, 60);
  }
  CATCH_CHECK_THROWS_WITH(GgufFile::open(cut.string()), Catch::Contains("runs past the end of the file (60 bytes)"));
}

CATCH_TEST_CASE("the real SmolLM2 GGUF (Q4_1, Q8_0, F32) reads as the Hugging Face checkpoint transformers converts it to", "[formats][gguf][real]") {
  const char* path = std::getenv("TESSERA_DECODER_GGUF");
  CATCH_REQUIRE(path != nullptr);  // scripts/bootstrap keeps the file and says where in env.sh
  auto f = GgufFile::open(path);
  // config.json's fields from the metadata: those transformers' conversion wrote.
  const auto theirs = nlohmann::json::parse(std::ifstream(test::decoder_dir() + "/config.json"));
  const auto ours = llama_config_from_gguf(*f);
  for (const char* k : {"model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                        "max_position_embeddings", "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"}) {
    CATCH_INFO(k);
    CATCH_CHECK(ours.at(k) == theirs.at(k));
  }
  CATCH_CHECK(ours["rms_norm_eps"].get<float>() == theirs["rms_norm_eps"].get<float>());
  CATCH_CHECK(ours["rope_theta"].get<double>() == theirs["rope_parameters"]["rope_theta"].get<double>());
  // Every tensor under its Hugging Face name, q and k un-permuted: bit for bit the converted
  // directory's (transformers dequantizes through the gguf package, then reorders q and k).
  auto hf = SafetensorsFile::open(test::decoder_dir() + "/model.safetensors");
  std::size_t compared = 0;
  std::set<std::string> types;
  for (const auto& t : f->tensors()) {
    const auto name = hf_name_from_gguf(t.name);
    CATCH_INFO(t.name);
    CATCH_REQUIRE(name.has_value());
    // Every layer's q and k (the permuted ones), layer 0 and the last whole, the rest's first rows.
    const bool whole = t.name.find("attn_q") != std::string::npos || t.name.find("attn_k") != std::string::npos || t.name.rfind("blk.0.", 0) == 0 ||
                       t.name.rfind("blk.29.", 0) == 0 || t.name.rfind("blk.", 0) != 0;
    if (!whole && t.name.find("ffn_up") == std::string::npos) continue;
    types.insert(GgufFile::type_name(t.type));
    CATCH_CHECK(at::equal(hf_tensor_from_gguf(*f, t.name), hf->tensor(*name)));
    ++compared;
  }
  CATCH_CHECK(compared > 90);
  CATCH_CHECK(types == std::set<std::string>{"F32", "Q4_1", "Q8_0"});
}

CATCH_TEST_CASE("SmolLM2 loaded straight from its GGUF file computes the converted directory's logits", "[formats][gguf][real]") {
  const char* path = std::getenv("TESSERA_DECODER_GGUF");
  CATCH_REQUIRE(path != nullptr);
  auto from_gguf = load_backbone(path, test::options());
  auto from_dir = load_backbone(test::decoder_dir(), test::options());
  const Tensor ids = at::tensor({1, 504, 3156, 314, 260, 1345, 28, 2, 2}, at::kLong).view({1, -1}).repeat({2, 1}).to(test::device());
  Tensor mask = at::ones_like(ids);
  mask[1].narrow(0, 6, 3).zero_();
  at::NoGradGuard no_grad;
  const Tensor a = from_gguf->lm_head().forward(from_gguf->lm_states(ids, mask, {}));
  const Tensor b = from_dir->lm_head().forward(from_dir->lm_states(ids, mask, {}));
  CATCH_CHECK(at::equal(a, b));  // the same weights, bit for bit, through the same code
  CATCH_CHECK(from_gguf->sites().linear_sites().size() == from_dir->sites().linear_sites().size());
  // A GGUF that is no LLaMA is refused, naming the key.
  CATCH_CHECK_THROWS_WITH(load_backbone(test::fixture("gguf/tensors.gguf"), test::options()), Catch::Contains("llama.embedding_length"));
}

CATCH_TEST_CASE("SmolLM2 trained on its GGUF blocks as they are: quantize gguf keeps Q4_1, and the products equal the dequantized model's", "[formats][gguf][real]") {
  const char* path = std::getenv("TESSERA_DECODER_GGUF");
  CATCH_REQUIRE(path != nullptr);
  auto dense = load_backbone(path, test::options());
  auto blocks = load_backbone(path, test::options());
  CATCH_CHECK(store_weights(blocks->sites(), "gguf", false, {}, path) == 30 * 7);
  std::int64_t stored = 0, dense_bytes = 0;
  for (auto* l : blocks->sites().linear_sites()) {
    const auto& w = ParameterSiteImpl::of(l->weight());
    if (w.stored() == nullptr) continue;
    CATCH_CHECK(std::string(w.stored()->format()) == "gguf");
    stored += w.stored()->stored_bytes();
    dense_bytes += w.stored()->dense().numel() * 4;
  }
  CATCH_CHECK(stored * 6 < dense_bytes);  // Q4_1: 20 bytes per 32 values against 128
  const Tensor ids = at::tensor({1, 504, 3156, 314, 260, 1345, 28}, at::kLong).view({1, -1}).to(test::device());
  const Tensor mask = at::ones_like(ids);
  at::NoGradGuard no_grad;
  const Tensor a = blocks->lm_head().forward(blocks->lm_states(ids, mask, {}));
  const Tensor b = dense->lm_head().forward(dense->lm_states(ids, mask, {}));
  CATCH_CHECK(test::max_abs_diff(a, b) < 1e-4 * b.abs().max().item<double>());  // the same weights; the products' rounding may differ
  CATCH_CHECK_THROWS_WITH(store_weights(dense->sites(), "gguf", false, {}, test::decoder_dir()), Catch::Contains("is no GGUF file"));
}

CATCH_TEST_CASE("GgufFile::release_pages: a tensor's resident pages of the mapping are given back and read the same again", "[formats][gguf][real]") {
  const char* path = std::getenv("TESSERA_DECODER_GGUF");
  CATCH_REQUIRE(path != nullptr);
  const auto f = GgufFile::open(path);
  const std::string name = "blk.3.ffn_up.weight";  // Q4_1, 1536 × 576: 553 KB of blocks
  const at::Tensor raw = f->raw(name);
  const auto checksum = [&] { return raw.to(at::kLong).sum().item<std::int64_t>(); };  // reads every byte
  const auto before = checksum();
  const long touched = mapping_rss_kib(raw.data_ptr());
  CATCH_REQUIRE(touched > 0);
  const std::size_t released = f->release_pages(name);
  const auto page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  CATCH_CHECK(released + 2 * page >= f->info(name).bytes);  // every whole page inside it
  CATCH_CHECK(touched - mapping_rss_kib(raw.data_ptr()) >= static_cast<long>(released / 1024));
  CATCH_CHECK(checksum() == before);  // the view reads the file again
}

CATCH_TEST_CASE("SmolLM2's GGUF streamed: its layer weights load as the file's blocks, never dense, and become what the storage stage asks", "[formats][gguf][real]") {
  const char* path = std::getenv("TESSERA_DECODER_GGUF");
  CATCH_REQUIRE(path != nullptr);
  auto dense = load_backbone(path, test::options());
  auto streamed = [&] {
    auto b = load_backbone(path, test::options(), true);
    std::size_t blocks = 0;
    for (auto* l : b->sites().linear_sites()) {
      const auto& w = ParameterSiteImpl::of(l->weight());
      if (w.stored() == nullptr) continue;
      CATCH_CHECK(!w.dense_base().defined());  // nothing dense was made of it
      CATCH_CHECK(!w.has_dense_copy());
      ++blocks;
    }
    CATCH_CHECK(blocks == 30 * 7);  // every layer's projection; the tied head stays dense
    return b;
  };
  // Kept as blocks: what quantize = "gguf" keeps after a dense load, bit for bit.
  auto kept = streamed();
  CATCH_CHECK(store_weights(kept->sites(), "gguf", false, {}, path) == 30 * 7);
  // Made dense: the dense load's bases; quantized again: the NF4 of the dense load's weights.
  auto made_dense = streamed();
  CATCH_CHECK(store_weights(made_dense->sites(), "none", false, {}, path) == 0);
  auto nf4 = streamed(), nf4_of_dense = load_backbone(path, test::options());
  store_weights(nf4->sites(), "nf4", true, {}, path);
  store_weights(nf4_of_dense->sites(), "nf4", true, {}, path);
  const auto& ld = dense->sites().linear_sites();
  for (std::size_t i = 0; i < ld.size(); ++i) {
    const auto& d = ParameterSiteImpl::of(ld[i]->weight());
    const auto& k = ParameterSiteImpl::of(kept->sites().linear_sites()[i]->weight());
    const auto& m = ParameterSiteImpl::of(made_dense->sites().linear_sites()[i]->weight());
    const auto& q = ParameterSiteImpl::of(nf4->sites().linear_sites()[i]->weight());
    const auto& r = ParameterSiteImpl::of(nf4_of_dense->sites().linear_sites()[i]->weight());
    CATCH_CHECK(m.stored() == nullptr);
    CATCH_CHECK(at::equal(m.base_value(), d.base_value()));
    if (k.stored() == nullptr) continue;  // the head
    CATCH_CHECK(std::string(k.stored()->format()) == "gguf");
    CATCH_CHECK(at::equal(k.base_value(), d.base_value()));
    CATCH_CHECK(std::string(q.stored()->format()) == "nf4");
    CATCH_CHECK(at::equal(q.base_value(), r.base_value()));
  }
  const Tensor ids = at::tensor({1, 504, 3156, 314, 260, 1345, 28}, at::kLong).view({1, -1}).to(test::device());
  const Tensor mask = at::ones_like(ids);
  at::NoGradGuard no_grad;
  CATCH_CHECK(at::equal(made_dense->lm_head().forward(made_dense->lm_states(ids, mask, {})), dense->lm_head().forward(dense->lm_states(ids, mask, {}))));
}
