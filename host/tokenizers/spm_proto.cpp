#include "tokenizers/spm_proto.h"

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string_view>

namespace tessera {
namespace {

// One protobuf message's bytes, read field by field.
class Wire {
 public:
  explicit Wire(std::string_view bytes) : rest_(bytes) {}
  bool done() const { return rest_.empty(); }

  std::uint64_t varint() {
    std::uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (rest_.empty()) throw std::runtime_error("a varint runs past the end");
      const auto b = static_cast<unsigned char>(rest_.front());
      rest_.remove_prefix(1);
      v |= static_cast<std::uint64_t>(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    throw std::runtime_error("a varint is longer than 10 bytes");
  }
  std::string_view take(std::uint64_t n) {
    if (n > rest_.size()) throw std::runtime_error("a field of " + std::to_string(n) + " bytes runs past the end");
    const auto v = rest_.substr(0, n);
    rest_.remove_prefix(n);
    return v;
  }
  // The next field: its number and wire type (0 varint, 1 fixed64, 2 length-delimited, 5 fixed32).
  std::pair<std::uint64_t, int> tag() {
    const std::uint64_t t = varint();
    const int wire = static_cast<int>(t & 7);
    if (wire != 0 && wire != 1 && wire != 2 && wire != 5) throw std::runtime_error("wire type " + std::to_string(wire) + " is not supported");
    return {t >> 3, wire};
  }
  std::string_view bytes() { return take(varint()); }
  float fixed32_float() {
    const auto b = take(4);
    std::uint32_t u = 0;
    for (int i = 3; i >= 0; --i) u = (u << 8) | static_cast<unsigned char>(b[static_cast<std::size_t>(i)]);  // little endian
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  void skip(int wire) {
    if (wire == 0) varint();
    else if (wire == 1) take(8);
    else if (wire == 2) bytes();
    else take(4);
  }

 private:
  std::string_view rest_;
};

SpmProto::Piece read_piece(std::string_view message) {  // message SentencePiece
  SpmProto::Piece p;
  std::uint64_t type = SpmProto::normal;
  for (Wire w(message); !w.done();) {
    const auto [field, wire] = w.tag();
    if (field == 1 && wire == 2) p.text = std::string(w.bytes());
    else if (field == 2 && wire == 5) p.score = w.fixed32_float();
    else if (field == 3 && wire == 0) type = w.varint();
    else w.skip(wire);
  }
  if (type < SpmProto::normal || type > SpmProto::byte) throw std::runtime_error("piece '" + p.text + "' has an unknown type");
  p.type = static_cast<SpmProto::Type>(type);
  return p;
}

}  // namespace

std::string find_spm_model(const std::string& dir) {
  namespace fs = std::filesystem;
  for (const char* name : {"tokenizer.model", "spiece.model"})
    if (fs::exists(fs::path(dir) / name)) return (fs::path(dir) / name).string();
  return "";
}

SpmProto read_spm_proto(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::runtime_error(file + ": cannot be read");
  std::ostringstream buffer;
  buffer << in.rdbuf();
  const std::string data = buffer.str();
  SpmProto proto;
  try {
    for (Wire w(data); !w.done();) {  // message ModelProto
      const auto [field, wire] = w.tag();
      if (field == 1 && wire == 2) {  // repeated SentencePiece pieces
        proto.pieces.push_back(read_piece(w.bytes()));
      } else if (field == 3 && wire == 2) {  // NormalizerSpec normalizer_spec: precompiled_charsmap = 2
        for (Wire n(w.bytes()); !n.done();) {
          const auto [f, nw] = n.tag();
          if (f == 2 && nw == 2) proto.precompiled_charsmap = std::string(n.bytes());
          else n.skip(nw);
        }
      } else {
        w.skip(wire);
      }
    }
    if (proto.pieces.empty()) throw std::runtime_error("no pieces");
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(file + ": not a SentencePiece model (" + e.what() + ")");
  }
  return proto;
}

}  // namespace tessera
