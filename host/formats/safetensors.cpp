#include "formats/safetensors.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <mutex>

namespace tessera {
namespace {

struct DType {
  const char* name;
  at::ScalarType type;
  std::size_t bytes;
};
constexpr DType kDTypes[] = {
    {"F64", at::kDouble, 8}, {"F32", at::kFloat, 4},  {"F16", at::kHalf, 2},  {"BF16", at::kBFloat16, 2},
    {"I64", at::kLong, 8},   {"I32", at::kInt, 4},    {"I16", at::kShort, 2}, {"I8", at::kChar, 1},
    {"U8", at::kByte, 1},    {"BOOL", at::kBool, 1},
};

const DType* dtype_by_name(const std::string& s) {
  for (const auto& d : kDTypes)
    if (s == d.name) return &d;
  return nullptr;
}

const DType* dtype_by_type(at::ScalarType t) {
  for (const auto& d : kDTypes)
    if (t == d.type) return &d;
  return nullptr;
}

// A header's shape: non-negative integers whose product (numel) fits a size_t.
std::vector<int64_t> shape_of(const std::string& path, const std::string& name, const nlohmann::json& dims, std::size_t& numel) {
  std::vector<int64_t> shape;
  numel = 1;
  for (const auto& d : dims) {
    if (!d.is_number_unsigned()) throw SafetensorsError(path, name, "shape has a negative or non-integer dimension");
    auto v = d.get<std::uint64_t>();
    if (v > static_cast<std::uint64_t>(std::numeric_limits<int64_t>::max()) || (v != 0 && numel > std::numeric_limits<std::size_t>::max() / v))
      throw SafetensorsError(path, name, "shape overflows");
    numel *= static_cast<std::size_t>(v);
    shape.push_back(static_cast<int64_t>(v));
  }
  return shape;
}

// Two tensors' data may touch but not overlap (empty ones aside).
void refuse_overlaps(const std::string& path, const std::vector<std::pair<std::size_t, std::size_t>>& spans, const std::vector<std::string>& names) {
  std::vector<std::size_t> order(spans.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](auto a, auto b) { return spans[a] < spans[b]; });
  for (std::size_t i = 1; i < order.size(); ++i)
    if (spans[order[i]].first < spans[order[i - 1]].second && spans[order[i]].first != spans[order[i]].second)
      throw SafetensorsError(path, names[order[i]], "data overlaps tensor '" + names[order[i - 1]] + "'");
}

// The mappings open now, so that release_mapped_pages() touches nothing else.
std::mutex& maps_mutex() {
  static std::mutex m;
  return m;
}
std::vector<std::pair<const char*, std::size_t>>& live_maps() {
  static std::vector<std::pair<const char*, std::size_t>> maps;
  return maps;
}

}  // namespace

SafetensorsError::SafetensorsError(const std::string& file, const std::string& tensor, const std::string& reason)
    : std::runtime_error(file + ": " + (tensor.empty() ? "" : "tensor '" + tensor + "': ") + reason), tensor_(tensor) {}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  auto fail = [&](const std::string& tensor, const std::string& why) { throw SafetensorsError(path, tensor, why); };
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("", std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) { ::close(fd); fail("", "cannot stat"); }
  std::size_t size = static_cast<std::size_t>(st.st_size);
  if (size < 8) { ::close(fd); fail("", "file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length"); }
  void* map = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) fail("", "mmap failed");

  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->map_ = map;
  file->size_ = size;
  {
    std::lock_guard<std::mutex> lock(maps_mutex());
    live_maps().emplace_back(static_cast<const char*>(map), size);
  }
  file->self_ = file;

  const auto* bytes = static_cast<const unsigned char*>(map);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
  if (n > size - 8) fail("", "header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(size) + " bytes)");
  const std::size_t data_start = 8 + n;
  const std::size_t data_size = size - data_start;

  nlohmann::json header;
  try {
    header = nlohmann::json::parse(reinterpret_cast<const char*>(bytes + 8), reinterpret_cast<const char*>(bytes + 8 + n));
  } catch (const std::exception& e) {
    fail("", std::string("header is not valid JSON: ") + e.what());
  }
  if (!header.is_object()) fail("", "header is not a JSON object");

  std::vector<std::pair<std::size_t, std::size_t>> spans;  // (begin, end) relative
  std::vector<std::string> span_names;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const auto& e = it.value();
    if (name == "__metadata__") {
      if (!e.is_object()) fail(name, "metadata must be an object of strings");
      for (auto m = e.begin(); m != e.end(); ++m) {
        if (!m.value().is_string()) fail(name, "metadata value '" + m.key() + "' is not a string");
        file->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") || !e.contains("data_offsets"))
      fail(name, "entry needs dtype, shape and data_offsets");
    if (!e["dtype"].is_string()) fail(name, "dtype is not a string");
    const DType* dt = dtype_by_name(e["dtype"].get<std::string>());
    if (dt == nullptr) fail(name, "unsupported dtype " + e["dtype"].get<std::string>());
    if (!e["shape"].is_array()) fail(name, "shape is not an array");
    std::size_t numel = 1;
    std::vector<int64_t> shape = shape_of(path, name, e["shape"], numel);
    const auto& off = e["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      fail(name, "data_offsets must be two non-negative integers");
    auto begin = off[0].get<std::uint64_t>(), end = off[1].get<std::uint64_t>();
    if (begin > end) fail(name, "data_offsets are reversed");
    if (end > data_size) fail(name, "data [" + std::to_string(begin) + ", " + std::to_string(end) + ") runs past the data block (" + std::to_string(data_size) + " bytes)");
    if (numel > std::numeric_limits<std::size_t>::max() / dt->bytes || end - begin != numel * dt->bytes)
      fail(name, "holds " + std::to_string(end - begin) + " bytes but its shape and dtype need " + std::to_string(numel * dt->bytes));
    spans.emplace_back(begin, end);
    span_names.push_back(name);
    file->entries_[name] = Entry{dt->type, std::move(shape), data_start + begin, data_start + end};
  }
  refuse_overlaps(path, spans, span_names);
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(maps_mutex());
    auto& maps = live_maps();
    maps.erase(std::remove(maps.begin(), maps.end(), std::make_pair(static_cast<const char*>(map_), size_)), maps.end());
  }
  munmap(map_, size_);
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& [k, _] : entries_) out.push_back(k);
  return out;
}

at::Tensor SafetensorsFile::tensor(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw SafetensorsError(path_, name, "no such tensor");
  const Entry& e = it->second;
  char* p = static_cast<char*>(map_) + e.begin;
  const DType* dt = dtype_by_type(e.dtype);
  if (reinterpret_cast<std::uintptr_t>(p) % dt->bytes != 0) {
    // Misaligned data: copy instead of handing out a misaligned view.
    at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(e.dtype));
    std::memcpy(t.data_ptr(), p, e.end - e.begin);
    return t;
  }
  auto keep = self_.lock();  // the tensor keeps the mapping alive
  return at::from_blob(p, e.shape, [keep](void*) {}, at::TensorOptions().dtype(e.dtype));
}

void write_file_atomic(const std::string& path, const std::string& text) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error("cannot write " + tmp);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    out.flush();
    if (!out) throw std::runtime_error("write failed: " + tmp);
  }
  int fd = ::open(tmp.c_str(), O_RDONLY);
  if (fd >= 0) { fsync(fd); ::close(fd); }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot rename " + tmp + " to " + path);
}

void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> blobs;
  std::size_t offset = 0;
  for (const auto& [name, t] : tensors) {
    const DType* dt = dtype_by_type(t.scalar_type());
    if (dt == nullptr) throw SafetensorsError(path, name, "cannot store dtype " + std::string(c10::toString(t.scalar_type())));
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    std::size_t nbytes = static_cast<std::size_t>(c.numel()) * dt->bytes;
    header[name] = {{"dtype", dt->name}, {"shape", c.sizes().vec()}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    blobs.push_back(c);
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // keep the data block 8-byte aligned
  std::string out;
  out.reserve(8 + h.size() + offset);
  std::uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  out += h;
  for (const auto& b : blobs) out.append(static_cast<const char*>(b.data_ptr()), static_cast<std::size_t>(b.numel()) * b.element_size());
  write_file_atomic(path, out);
}

std::map<std::string, at::Tensor> read_safetensors(const std::string& path) {
  auto file = SafetensorsFile::open(path);
  std::map<std::string, at::Tensor> out;
  for (const auto& n : file->names()) out[n] = file->tensor(n);
  return out;
}

std::size_t release_mapped_pages(const at::Tensor& t) {
  if (!t.defined() || !t.device().is_cpu() || !t.has_storage()) return 0;
  const char* begin = static_cast<const char*>(t.storage().data());
  const char* end = begin + t.storage().nbytes();
  const auto page = static_cast<std::uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto first = (reinterpret_cast<std::uintptr_t>(begin) + page - 1) / page * page;  // whole pages inside
  const auto last = reinterpret_cast<std::uintptr_t>(end) / page * page;
  if (last <= first) return 0;
  std::lock_guard<std::mutex> lock(maps_mutex());
  for (const auto& [map, size] : live_maps())
    if (begin >= map && end <= map + size) {
      madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
      return last - first;
    }
  return 0;  // not a mapped file's (a converted copy: freed with its last reference)
}

}  // namespace tessera
