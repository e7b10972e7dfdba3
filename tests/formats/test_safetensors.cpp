#include "support.h"

#include <fstream>

using namespace tessera;

namespace {

// A file with a hand-written header: what a truncated or lying writer would produce.
std::string write_raw(const std::filesystem::path& dir, const std::string& name, const std::string& header, std::size_t data_bytes,
                      std::uint64_t claimed_len = 0) {
  std::string path = (dir / name).string();
  std::ofstream out(path, std::ios::binary);
  std::uint64_t n = claimed_len ? claimed_len : header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
  out << header << std::string(data_bytes, '\0');
  return path;
}

std::string error_of(const std::string& path) {
  try {
    SafetensorsFile::open(path);
  } catch (const SafetensorsError& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

CATCH_TEST_CASE("safetensors round trip, zero-copy reads", "[model][safetensors]") {
  auto dir = test::temp_dir("st");
  NamedTensors t = {{"a", at::randn({3, 4})}, {"b", at::arange(5, at::kLong)}, {"c", at::randn({2}).to(at::kBFloat16)}};
  save_safetensors((dir / "x.safetensors").string(), t, {{"format", "pt"}});
  auto f = SafetensorsFile::open((dir / "x.safetensors").string());
  CATCH_CHECK(f->names() == std::vector<std::string>{"a", "b", "c"});
  CATCH_CHECK(f->metadata().at("format") == "pt");
  for (const auto& [k, v] : t) CATCH_CHECK(at::equal(f->tensor(k), v));
  // A read tensor outlives the file object: it holds the mapping.
  Tensor a = f->tensor("a");
  f.reset();
  CATCH_CHECK(at::equal(a, t["a"]));
}

CATCH_TEST_CASE("safetensors headers that lie are refused with the tensor named", "[model][safetensors]") {
  auto dir = test::temp_dir("st-bad");
  const std::string good = R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})";
  CATCH_CHECK(error_of(write_raw(dir, "ok", good, 16)) == "no error");
  // Truncated data block.
  auto e = error_of(write_raw(dir, "trunc", good, 8));
  CATCH_CHECK_THAT(e, Catch::Contains("tensor 'w'") && Catch::Contains("runs past the data block"));
  // Header length larger than the file.
  e = error_of(write_raw(dir, "len", good, 16, 1u << 20));
  CATCH_CHECK_THAT(e, Catch::Contains("header length 1048576 runs past the end"));
  // Shape and byte count disagree.
  e = error_of(write_raw(dir, "size", R"({"w":{"dtype":"F32","shape":[3,2],"data_offsets":[0,16]}})", 16));
  CATCH_CHECK_THAT(e, Catch::Contains("tensor 'w'") && Catch::Contains("need 24"));
  // Two tensors share bytes.
  e = error_of(write_raw(dir, "overlap",
                         R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 16));
  CATCH_CHECK_THAT(e, Catch::Contains("tensor 'b'") && Catch::Contains("overlaps tensor 'a'"));
  // Unknown dtype, negative dimension, reversed offsets, broken JSON, tiny file.
  CATCH_CHECK_THAT(error_of(write_raw(dir, "dt", R"({"w":{"dtype":"F7","shape":[1],"data_offsets":[0,1]}})", 1)), Catch::Contains("unsupported dtype F7"));
  CATCH_CHECK_THAT(error_of(write_raw(dir, "neg", R"({"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}})", 1)), Catch::Contains("negative"));
  CATCH_CHECK_THAT(error_of(write_raw(dir, "rev", R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}})", 1)), Catch::Contains("reversed"));
  CATCH_CHECK_THAT(error_of(write_raw(dir, "json", R"({"w":{"dtype":)", 0)), Catch::Contains("not valid JSON"));
  {
    std::ofstream((dir / "tiny").string()) << "abc";
  }
  CATCH_CHECK_THAT(error_of((dir / "tiny").string()), Catch::Contains("shorter than the 8-byte header"));
}
