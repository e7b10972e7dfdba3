// Safetensors files: a memory-mapped reader that validates the whole header before any
// tensor is touched, and an atomic writer.
//
// Format: 8-byte little-endian header length N, N bytes of JSON
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the
// data block; offsets are relative to the data block.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace tessera {

// A file that is not a valid safetensors file. `tensor` names the offending entry when
// there is one.
class SafetensorsError : public std::runtime_error {
 public:
  SafetensorsError(const std::string& file, const std::string& tensor, const std::string& reason);
  const std::string& tensor() const { return tensor_; }

 private:
  std::string tensor_;
};

class SafetensorsFile {
 public:
  // Maps the file privately (copy-on-write: a write never reaches the file) and checks
  // header bounds, JSON, dtypes, shapes, sizes and overlaps.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);

  const std::string& path() const { return path_; }
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // A tensor that views the mapping (zero copy); it keeps the mapping alive.
  at::Tensor tensor(const std::string& name) const;

  ~SafetensorsFile();

 private:
  struct Entry {
    at::ScalarType dtype;
    std::vector<int64_t> shape;
    std::size_t begin, end;  // absolute offsets in the file
  };
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  std::size_t size_ = 0;
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
  std::weak_ptr<SafetensorsFile> self_;
};

// Drops the resident pages that lie wholly inside `t`'s bytes when they are those of a
// mapped file (a weight just quantized: nothing reads them again; tensors of a file never
// overlap). Were they read again, they would come back from the file. Returns the bytes
// released; 0 for a tensor that is not a mapped file's.
std::size_t release_mapped_pages(const at::Tensor& t);

// Every tensor of a file, by name (views of the mapping).
std::map<std::string, at::Tensor> read_safetensors(const std::string& path);

// Writes tensors (made contiguous, moved to the CPU) to `path` through a temporary file
// and a rename, so a reader never sees a half-written file.
void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// Writes text to `path` atomically (temporary file, fsync, rename).
void write_file_atomic(const std::string& path, const std::string& text);

}  // namespace tessera
