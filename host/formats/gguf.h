// GGUF files (llama.cpp's format, version 2 and 3): a memory-mapped reader that validates the
// whole header — metadata, tensor infos, every tensor's bytes inside the file — before any
// tensor is touched, and dequantizes F32, F16, BF16, Q4_0, Q4_1 and Q8_0 tensors to float32.
//
// Layout (little-endian): "GGUF", u32 version, u64 tensor count, u64 metadata count; each
// metadata entry a string key (u64 length + bytes), a u32 value type and the value (arrays:
// u32 element type, u64 count, elements); each tensor info a string name, u32 n_dims, n_dims
// u64 extents (innermost first), u32 ggml type, u64 offset into the data block; the data
// block starts at the next multiple of general.alignment (32 unless the metadata says).
// Blocks of 32 values: Q4_0 = f16 d, 16 bytes of nibbles, x = d (q − 8); Q4_1 = f16 d, f16 m,
// nibbles, x = d q + m; Q8_0 = f16 d, 32 int8, x = d q. Nibble j of a block holds value j in
// its low half and value j + 16 in its high half.
#pragma once

#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace tessera {

// A file that is not a GGUF file Tessera reads. `tensor` names the offending entry when there is one.
class GgufError : public std::runtime_error {
 public:
  GgufError(const std::string& file, const std::string& tensor, const std::string& reason);
  const std::string& tensor() const { return tensor_; }

 private:
  std::string tensor_;
};

class GgufFile {
 public:
  struct TensorInfo {
    std::string name;
    std::vector<std::int64_t> shape;  // torch's order: outermost first (GGUF lists extents innermost first)
    std::uint32_t type = 0;           // ggml_type: 0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0, 30 BF16
    std::size_t offset = 0, bytes = 0;  // absolute offset in the file, and length
  };

  // Maps the file read-only and checks everything above; throws GgufError naming the
  // tensor or key at fault.
  static std::shared_ptr<GgufFile> open(const std::string& path);
  ~GgufFile();

  const std::string& path() const { return path_; }
  std::uint32_t version() const { return version_; }
  // Every metadata entry, its value as JSON (integers, floats, bools, strings, arrays).
  const nlohmann::json& metadata() const { return metadata_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo& info(const std::string& name) const;  // throws GgufError for an unknown name
  bool has(const std::string& name) const { return index_.count(name) != 0; }
  // The tensor as float32, a fresh tensor of info(name).shape.
  at::Tensor dequantize(const std::string& name) const;
  // Its bytes as (blocks, bytes per block) uint8, a view of the mapping: valid while this
  // file is (hold the shared_ptr).
  at::Tensor raw(const std::string& name) const;
  // Gives back the whole pages of the mapping that hold the tensor's bytes (MADV_DONTNEED):
  // resident memory once its values live elsewhere (dequantized, quantized again). Pages
  // touched later are read from the file again, so views stay valid. Returns the bytes given back.
  std::size_t release_pages(const std::string& name) const;
  static const char* type_name(std::uint32_t type);  // "Q4_1", or nullptr for a type not read here

 private:
  GgufFile() = default;
  std::string path_;
  void* map_ = nullptr;
  std::size_t size_ = 0;
  std::uint32_t version_ = 0;
  nlohmann::json metadata_ = nlohmann::json::object();
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::size_t> index_;
};

// raw (blocks, bytes per block) uint8 of ggml type `type` -> float32 of `shape`, on raw's device.
at::Tensor dequantize_gguf(const at::Tensor& raw, std::uint32_t type, at::IntArrayRef shape);

}  // namespace tessera
