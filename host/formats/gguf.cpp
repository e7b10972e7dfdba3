#include "formats/gguf.h"

#include <ATen/ATen.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace tessera {
namespace {

// ggml's element layout per type: values per block and bytes per block.
struct Layout {
  const char* name;
  std::int64_t values, bytes;
};

const Layout* layout_of(std::uint32_t type) {
  static const std::map<std::uint32_t, Layout> kLayouts = {
      {0, {"F32", 1, 4}}, {1, {"F16", 1, 2}}, {2, {"Q4_0", 32, 18}}, {3, {"Q4_1", 32, 20}}, {8, {"Q8_0", 32, 34}}, {30, {"BF16", 1, 2}}};
  const auto it = kLayouts.find(type);
  return it == kLayouts.end() ? nullptr : &it->second;
}

// Bounds-checked little-endian reads over the mapping; every failure names where it was.
class Cursor {
 public:
  Cursor(const unsigned char* bytes, std::size_t size, const std::string& path) : p_(bytes), size_(size), path_(path) {}
  std::size_t at() const { return at_; }
  void need(std::size_t n, const std::string& what) const {
    if (n > size_ - at_) throw GgufError(path_, "", what + " runs past the end of the file (" + std::to_string(size_) + " bytes) at byte " + std::to_string(at_));
  }
  template <class T>
  T read(const std::string& what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, p_ + at_, sizeof(T));
    at_ += sizeof(T);
    return v;
  }
  std::string string(const std::string& what) {
    const auto n = read<std::uint64_t>(what + "'s length");
    need(n, what);
    std::string s(reinterpret_cast<const char*>(p_ + at_), n);
    at_ += n;
    return s;
  }

 private:
  const unsigned char* p_;
  std::size_t size_, at_ = 0;
  const std::string& path_;
};

// One metadata value of GGUF type `type` (arrays: their elements, recursively).
nlohmann::json read_value(Cursor& c, std::uint32_t type, const std::string& key, const std::string& path) {
  switch (type) {
    case 0: return c.read<std::uint8_t>(key);
    case 1: return c.read<std::int8_t>(key);
    case 2: return c.read<std::uint16_t>(key);
    case 3: return c.read<std::int16_t>(key);
    case 4: return c.read<std::uint32_t>(key);
    case 5: return c.read<std::int32_t>(key);
    case 6: return c.read<float>(key);
    case 7: return c.read<std::uint8_t>(key) != 0;
    case 8: return c.string(key);
    case 9: {
      const auto elem = c.read<std::uint32_t>(key + "'s element type");
      const auto n = c.read<std::uint64_t>(key + "'s length");
      c.need(n, key);  // every element takes at least one byte: a corrupt count fails here, not in a huge allocation
      nlohmann::json a = nlohmann::json::array();
      for (std::uint64_t i = 0; i < n; ++i) a.push_back(read_value(c, elem, key, path));
      return a;
    }
    case 10: return c.read<std::uint64_t>(key);
    case 11: return c.read<std::int64_t>(key);
    case 12: return c.read<double>(key);
    default: throw GgufError(path, "", "metadata '" + key + "' has value type " + std::to_string(type) + ", which GGUF does not define");
  }
}

// Columns [from, from + n) of a (blocks, bytes) tensor read as `dtype` values: (blocks, n / size).
at::Tensor field(const at::Tensor& b, std::int64_t from, std::int64_t n, at::ScalarType dtype) {
  return b.narrow(1, from, n).contiguous().view(dtype).to(at::kFloat);
}

// The 32 values of each block from its 16 nibble bytes: low halves first, then high halves.
at::Tensor nibbles(const at::Tensor& qs) { return at::cat({at::bitwise_and(qs, 0x0F), at::bitwise_right_shift(qs, 4)}, 1).to(at::kFloat); }

}  // namespace

GgufError::GgufError(const std::string& file, const std::string& tensor, const std::string& reason)
    : std::runtime_error(file + (tensor.empty() ? "" : ": tensor '" + tensor + "'") + ": " + reason), tensor_(tensor) {}

std::shared_ptr<GgufFile> GgufFile::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw GgufError(path, "", std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    throw GgufError(path, "", "cannot stat");
  }
  const auto size = static_cast<std::size_t>(st.st_size);
  void* map = size > 0 ? mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
  ::close(fd);
  if (map == MAP_FAILED) throw GgufError(path, "", size == 0 ? "the file is empty" : "mmap failed");
  std::shared_ptr<GgufFile> f(new GgufFile());
  f->path_ = path, f->map_ = map, f->size_ = size;

  Cursor c(static_cast<const unsigned char*>(map), size, f->path_);
  if (c.read<std::uint32_t>("the magic") != 0x46554747u) throw GgufError(path, "", "not a GGUF file (its first bytes are not \"GGUF\")");
  f->version_ = c.read<std::uint32_t>("the version");
  if (f->version_ != 2 && f->version_ != 3) throw GgufError(path, "", "GGUF version " + std::to_string(f->version_) + " (2 and 3 are read)");
  const auto n_tensors = c.read<std::uint64_t>("the tensor count");
  const auto n_meta = c.read<std::uint64_t>("the metadata count");
  for (std::uint64_t i = 0; i < n_meta; ++i) {
    const std::string key = c.string("metadata key " + std::to_string(i));
    const auto type = c.read<std::uint32_t>("metadata '" + key + "''s type");
    f->metadata_[key] = read_value(c, type, key, path);
  }
  std::uint64_t alignment = 32;
  if (f->metadata_.contains("general.alignment")) {
    const auto& a = f->metadata_["general.alignment"];
    if (!a.is_number_unsigned() || a.get<std::uint64_t>() == 0 || (a.get<std::uint64_t>() & (a.get<std::uint64_t>() - 1)) != 0)
      throw GgufError(path, "", "general.alignment must be a power of two, not " + a.dump());
    alignment = a.get<std::uint64_t>();
  }
  for (std::uint64_t i = 0; i < n_tensors; ++i) {
    TensorInfo t;
    t.name = c.string("tensor info " + std::to_string(i));
    const auto dims = c.read<std::uint32_t>(t.name + "'s rank");
    if (dims == 0 || dims > 4) throw GgufError(path, t.name, "has " + std::to_string(dims) + " dimensions (1 to 4)");
    std::int64_t count = 1;
    for (std::uint32_t d = 0; d < dims; ++d) {
      const auto e = c.read<std::uint64_t>(t.name + "'s extents");
      if (e == 0 || e > (1ull << 40)) throw GgufError(path, t.name, "has an extent of " + std::to_string(e));
      if (count > (std::int64_t{1} << 50) / static_cast<std::int64_t>(e))  // before the product overflows: no file holds 2^50 values
        throw GgufError(path, t.name, "has more than 2^50 elements: corrupt extents");
      t.shape.insert(t.shape.begin(), static_cast<std::int64_t>(e));
      count *= static_cast<std::int64_t>(e);
    }
    t.type = c.read<std::uint32_t>(t.name + "'s type");
    const std::uint64_t rel = c.read<std::uint64_t>(t.name + "'s offset");
    const Layout* l = layout_of(t.type);
    if (l == nullptr) throw GgufError(path, t.name, "has ggml type " + std::to_string(t.type) + ", which is not one read here (F32, F16, BF16, Q4_0, Q4_1, Q8_0)");
    if (t.shape.back() % l->values != 0)
      throw GgufError(path, t.name, std::string(l->name) + " blocks hold " + std::to_string(l->values) + " values, which do not divide its rows of " + std::to_string(t.shape.back()));
    if (rel % alignment != 0) throw GgufError(path, t.name, "its offset " + std::to_string(rel) + " is not a multiple of the alignment " + std::to_string(alignment));
    t.bytes = static_cast<std::size_t>(count / l->values * l->bytes);
    t.offset = static_cast<std::size_t>(rel);  // relative until the data block's start is known
    if (f->index_.count(t.name)) throw GgufError(path, t.name, "appears twice");
    f->index_[t.name] = f->tensors_.size();
    f->tensors_.push_back(std::move(t));
  }
  const std::size_t data = (c.at() + alignment - 1) / alignment * alignment;
  for (auto& t : f->tensors_) {
    if (t.offset > size || data > size - t.offset || t.bytes > size - data - t.offset)
      throw GgufError(path, t.name, "its " + std::to_string(t.bytes) + " bytes at offset " + std::to_string(t.offset) + " of the data block (byte " + std::to_string(data) +
                                        ") leave the file of " + std::to_string(size) + " bytes: truncated or corrupt");
    t.offset += data;
  }
  return f;
}

GgufFile::~GgufFile() {
  if (map_ != nullptr) munmap(map_, size_);
}

const GgufFile::TensorInfo& GgufFile::info(const std::string& name) const {
  const auto it = index_.find(name);
  if (it == index_.end()) throw GgufError(path_, name, "is not in the file");
  return tensors_[it->second];
}

const char* GgufFile::type_name(std::uint32_t type) {
  const Layout* l = layout_of(type);
  return l ? l->name : nullptr;
}

at::Tensor GgufFile::raw(const std::string& name) const {
  const TensorInfo& t = info(name);
  const Layout& l = *layout_of(t.type);
  auto* base = static_cast<unsigned char*>(map_) + t.offset;
  return at::from_blob(base, {static_cast<std::int64_t>(t.bytes) / l.bytes, l.bytes}, at::TensorOptions().dtype(at::kByte));
}

std::size_t GgufFile::release_pages(const std::string& name) const {
  const TensorInfo& t = info(name);
  const auto page = static_cast<std::uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<std::uintptr_t>(map_) + t.offset;
  const auto first = (begin + page - 1) / page * page, last = (begin + t.bytes) / page * page;  // whole pages only: a neighbour's share stays
  if (last <= first || madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED) != 0) return 0;
  return last - first;
}

at::Tensor GgufFile::dequantize(const std::string& name) const {
  const TensorInfo& t = info(name);
  return dequantize_gguf(raw(name), t.type, t.shape);
}

at::Tensor dequantize_gguf(const at::Tensor& b, std::uint32_t type, at::IntArrayRef shape) {
  at::Tensor x;
  switch (type) {
    case 0: x = b.view(at::kFloat).clone(); break;
    case 1: x = b.view(at::kHalf).to(at::kFloat); break;
    case 30: x = b.view(at::kBFloat16).to(at::kFloat); break;
    case 2: x = (nibbles(b.narrow(1, 2, 16)) - 8) * field(b, 0, 2, at::kHalf); break;
    case 3: x = nibbles(b.narrow(1, 4, 16)) * field(b, 0, 2, at::kHalf) + field(b, 2, 2, at::kHalf); break;
    case 8: x = b.narrow(1, 2, 32).contiguous().view(at::kChar).to(at::kFloat) * field(b, 0, 2, at::kHalf); break;
    default: throw std::invalid_argument("ggml type " + std::to_string(type) + " is not one read here");
  }
  return x.reshape(shape);
}

}  // namespace tessera
