// The weights of a Hugging Face model directory: `model.safetensors`, or the shards named
// by `model.safetensors.index.json`, all memory-mapped — or of a LLaMA GGUF file, its
// tensors under their Hugging Face names, dequantized to float32 as they are taken
// (formats/gguf_llama.h). Tensors are converted from their
// stored dtype (f32, f16, bf16) to the compute options on the way out; an architecture
// asks for every tensor it needs by name and shape, and what it never asked for is
// reported as unexpected.
#pragma once

#include "formats/safetensors.h"

#include <c10/core/TensorOptions.h>

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace tessera {

class GgufFile;
class StoredTensor;

// A path that names a GGUF file (….gguf, a regular file) rather than a model directory.
bool is_gguf_file(const std::string& path);

class Checkpoint {
 public:
  // Refuses a directory without weights, naming what it looked for. `dir` may name a GGUF file.
  static Checkpoint open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  std::vector<std::string> names() const;  // every tensor of every shard, sorted
  // The tensor as the file stores it (its dtype, a view of the mapping); not recorded as taken.
  at::Tensor stored(const std::string& name) const;
  // The tensor, checked against `shape`, converted to `options`, frozen. A missing name
  // is recorded (see finish()) and a stand-in of that shape returned (one zero broadcast,
  // no memory) that the model may be built around but never run with: loading goes on,
  // and finish() reports every missing tensor at once.
  at::Tensor take(const std::string& name, const std::vector<int64_t>& shape, c10::TensorOptions options);
  // A GGUF file's tensor kept as its own Q4_0, Q4_1 or Q8_0 blocks (formats/gguf_llama.h's
  // storage), checked against `shape` and recorded as taken, without a dense copy ever being
  // made: how a model whose weights stay in the file's blocks loads one tensor at a time.
  // Null — nothing recorded — for a safetensors checkpoint, a missing name or another type.
  std::unique_ptr<StoredTensor> take_blocks(const std::string& name, const std::vector<int64_t>& shape, c10::TensorOptions options);
  // Refuses a layer count (`key` of the config file `config`) that runs past the
  // checkpoint: no tensor is named `layer_prefix` + (count − 1) + ".…". Checked before the
  // layers are built, so that a wrong count is named as such, not as many missing tensors.
  void check_layer_count(const std::string& config, const char* key, std::int64_t count, const std::string& layer_prefix) const;
  // The first of `names` present, or nullopt (nothing recorded as missing).
  std::optional<std::string> first_present(const std::vector<std::string>& names) const;
  // Throws a SafetensorsError listing every missing tensor by name; otherwise returns the
  // tensors never taken (unexpected: task heads, buffers such as position_ids).
  std::vector<std::string> finish() const;

 private:
  // Where a tensor is: a safetensors shard, or (file null) the GGUF file under its own name.
  struct Source {
    std::shared_ptr<SafetensorsFile> file;
    std::string gguf_name;
  };
  at::Tensor read(const std::string& name, const Source& s) const;
  const std::string& path_of(const Source& s) const;
  std::string dir_;
  std::shared_ptr<GgufFile> gguf_;
  std::map<std::string, Source> where_;  // tensor name -> where it is
  std::set<std::string> taken_;
  std::vector<std::string> missing_;
};

}  // namespace tessera
