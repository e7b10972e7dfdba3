#include "train/tensorboard.h"

#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <stdexcept>

namespace tessera {
namespace {

// Protobuf's wire format, the four kinds an Event of scalars uses.
void varint(std::string& out, std::uint64_t v) {
  while (v >= 0x80) out.push_back(static_cast<char>((v & 0x7f) | 0x80)), v >>= 7;
  out.push_back(static_cast<char>(v));
}
void key(std::string& out, int field, int wire) { varint(out, static_cast<std::uint64_t>(field) << 3 | static_cast<std::uint64_t>(wire)); }
template <class T>
void fixed(std::string& out, T v) {  // little-endian, as x86-64 stores it
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out.append(b, sizeof(T));
}
void bytes(std::string& out, int field, const std::string& v) {
  key(out, field, 2);
  varint(out, v.size());
  out += v;
}

double now() { return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count(); }

// Event { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
std::string event(std::int64_t step, const std::string* file_version, const std::string* summary) {
  std::string e;
  key(e, 1, 1), fixed(e, now());
  key(e, 2, 0), varint(e, static_cast<std::uint64_t>(step));
  if (file_version != nullptr) bytes(e, 3, *file_version);
  if (summary != nullptr) bytes(e, 5, *summary);
  return e;
}

std::uint32_t masked(std::uint32_t crc) { return ((crc >> 15) | (crc << 17)) + 0xa282ead8u; }

}  // namespace

std::uint32_t crc32c(const void* data, std::size_t size) {
  static const auto table = [] {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1;  // the reflected Castagnoli polynomial
      t[i] = c;
    }
    return t;
  }();
  std::uint32_t crc = 0xffffffffu;
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < size; ++i) crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return crc ^ 0xffffffffu;
}

EventWriter::EventWriter(const std::string& dir) {
  std::filesystem::create_directories(dir);
  char host[256] = "localhost";
  ::gethostname(host, sizeof host - 1);
  path_ = (std::filesystem::path(dir) / ("events.out.tfevents." + std::to_string(static_cast<long long>(now())) + "." + host + "." +
                                         std::to_string(::getpid())))
              .string();
  out_.open(path_, std::ios::binary);
  if (!out_) throw std::runtime_error("cannot write the TensorBoard file " + path_);
  const std::string version = "brain.Event:2";
  record(event(0, &version, nullptr));
}

void EventWriter::scalar(const std::string& tag, double value, std::int64_t step) {
  std::string v;  // Summary.Value { string tag = 1; float simple_value = 2; }
  bytes(v, 1, tag);
  key(v, 2, 5), fixed(v, static_cast<float>(value));
  std::string summary;  // Summary { repeated Value value = 1; }
  bytes(summary, 1, v);
  record(event(step, nullptr, &summary));
}

void EventWriter::record(const std::string& e) {
  std::string frame;
  const std::uint64_t length = e.size();
  fixed(frame, length);
  fixed(frame, masked(crc32c(&length, sizeof length)));
  frame += e;
  fixed(frame, masked(crc32c(e.data(), e.size())));
  out_.write(frame.data(), static_cast<std::streamsize>(frame.size()));
  out_.flush();
  if (!out_) throw std::runtime_error("writing the TensorBoard file " + path_ + " failed");
}

}  // namespace tessera
