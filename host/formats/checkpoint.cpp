#include "formats/checkpoint.h"

#include "formats/gguf_llama.h"
#include "formats/json_file.h"

#include <tessera/internal/sites_impl.h>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <filesystem>

namespace tessera {

bool is_gguf_file(const std::string& path) {
  return path.size() > 5 && path.compare(path.size() - 5, 5, ".gguf") == 0 && std::filesystem::is_regular_file(path);
}

Checkpoint Checkpoint::open(const std::string& dir) {
  namespace fs = std::filesystem;
  Checkpoint c;
  c.dir_ = dir;
  if (is_gguf_file(dir)) {  // every tensor under its Hugging Face name; one outside the map stays under its own (unexpected)
    c.gguf_ = GgufFile::open(dir);
    for (const auto& t : c.gguf_->tensors()) c.where_[hf_name_from_gguf(t.name).value_or(t.name)] = {nullptr, t.name};
    return c;
  }
  const fs::path single = fs::path(dir) / "model.safetensors", index = fs::path(dir) / "model.safetensors.index.json";
  if (fs::exists(single)) {
    auto f = SafetensorsFile::open(single.string());
    for (const auto& n : f->names()) c.where_[n] = {f, {}};
  } else if (fs::exists(index)) {
    const nlohmann::json j = read_json_file(index.string());
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      throw std::runtime_error(index.string() + ": no \"weight_map\" object");
    std::map<std::string, std::shared_ptr<SafetensorsFile>> shards;
    for (const auto& [name, shard] : j["weight_map"].items()) {
      if (!shard.is_string()) throw std::runtime_error(index.string() + ": weight_map entry '" + name + "' is not a file name");
      auto& f = shards[shard.get<std::string>()];
      if (!f) f = SafetensorsFile::open((fs::path(dir) / shard.get<std::string>()).string());
      if (!f->contains(name)) throw SafetensorsError(f->path(), name, "is listed in model.safetensors.index.json but not in its shard");
      c.where_[name] = {f, {}};
    }
  } else {
    throw std::runtime_error(dir + ": no model.safetensors or model.safetensors.index.json (a pytorch_model.bin must be converted to safetensors first)");
  }
  return c;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [n, f] : where_) out.push_back(n);
  return out;
}

at::Tensor Checkpoint::read(const std::string& name, const Source& s) const { return s.file ? s.file->tensor(name) : hf_tensor_from_gguf(*gguf_, s.gguf_name); }

const std::string& Checkpoint::path_of(const Source& s) const { return s.file ? s.file->path() : dir_; }

at::Tensor Checkpoint::stored(const std::string& name) const {
  const auto it = where_.find(name);
  if (it == where_.end()) throw SafetensorsError(dir_, name, "is not in the checkpoint");
  return read(name, it->second);
}

std::optional<std::string> Checkpoint::first_present(const std::vector<std::string>& names) const {
  for (const auto& n : names)
    if (contains(n)) return n;
  return std::nullopt;
}

at::Tensor Checkpoint::take(const std::string& name, const std::vector<int64_t>& shape, c10::TensorOptions options) {
  auto it = where_.find(name);
  if (it == where_.end()) {
    for (const auto d : shape)
      if (d < 0) throw SafetensorsError(dir_, name, "the config gives it a negative size " + c10::str(at::IntArrayRef(shape)));
    missing_.push_back(name);
    return at::zeros({}, options).expand(shape);
  }
  at::Tensor t = read(name, it->second);
  if (t.sizes().vec() != shape)
    throw SafetensorsError(path_of(it->second), name, "has shape " + c10::str(t.sizes()) + ", the config needs " + c10::str(at::IntArrayRef(shape)));
  taken_.insert(name);
  // Same dtype and device: a zero-copy view of the (private) mapping; otherwise converted.
  // A GGUF tensor was dequantized into a fresh one: its blocks' pages are not needed again.
  if (!it->second.file) gguf_->release_pages(it->second.gguf_name);
  return t.to(options).detach().set_requires_grad(false);
}

std::unique_ptr<StoredTensor> Checkpoint::take_blocks(const std::string& name, const std::vector<int64_t>& shape, c10::TensorOptions options) {
  const auto it = where_.find(name);
  if (!gguf_ || it == where_.end() || it->second.file) return nullptr;
  const auto& info = gguf_->info(it->second.gguf_name);
  if (info.type != 2 && info.type != 3 && info.type != 8) return nullptr;  // Q4_0, Q4_1, Q8_0
  if (info.shape != shape)
    throw SafetensorsError(dir_, name, "has shape " + c10::str(at::IntArrayRef(info.shape)) + ", the config needs " + c10::str(at::IntArrayRef(shape)));
  auto blocks = gguf_storage(gguf_, it->second.gguf_name, options);
  taken_.insert(name);
  return blocks;
}

void Checkpoint::check_layer_count(const std::string& config, const char* key, std::int64_t count, const std::string& layer_prefix) const {
  const std::string last = layer_prefix + std::to_string(count - 1) + ".";
  const auto it = where_.lower_bound(last);
  if (it == where_.end() || it->first.compare(0, last.size(), last) != 0)
    throw std::runtime_error(config + ": " + key + " is " + std::to_string(count) + ", but " + dir_ + " has no tensor named " + last + "…");
}

std::vector<std::string> Checkpoint::finish() const {
  if (!missing_.empty()) {
    std::string list;
    for (const auto& n : missing_) list += (list.empty() ? "" : ", ") + n;
    throw SafetensorsError(dir_, missing_.front(), std::to_string(missing_.size()) + " tensor(s) missing from the checkpoint: " + list);
  }
  std::vector<std::string> unexpected;
  for (const auto& [n, f] : where_)
    if (!taken_.count(n)) unexpected.push_back(n);
  return unexpected;
}

}  // namespace tessera
