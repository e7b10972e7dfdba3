// What a plugin source includes last: TESSERA_PLUGIN(...) exports the one entry symbol
// with the descriptor and the build fingerprint of *this* translation unit.
//
//   class Lora final : public tessera::Method { ... };
//   TESSERA_PLUGIN(Lora, "lora", "1.0.0", "reparameterized",
//                  "Low-rank update of linear weights", "Hu et al. 2021, arXiv:2106.09685")
//
// Keep static initialisers trivial: they run inside dlopen, before any version check.
#pragma once

#include <tessera/abi.h>
#include <tessera/fingerprint.h>
#include <tessera/method.h>

#include <cstring>
#include <exception>

namespace tessera::detail {
inline void write_error(char* err, std::size_t n, const char* what) noexcept {
  if (err == nullptr || n == 0) return;
  std::strncpy(err, what, n - 1);
  err[n - 1] = '\0';
}
}  // namespace tessera::detail

#define TESSERA_PLUGIN(Class, Id, Version, Family, Summary, Paper)                              \
  namespace {                                                                                   \
  void* tessera_create_method(char* err, std::size_t n) noexcept {                              \
    try {                                                                                       \
      return static_cast<void*>(static_cast<::tessera::Method*>(new Class()));                  \
    } catch (const std::exception& e) {                                                         \
      ::tessera::detail::write_error(err, n, e.what());                                         \
    } catch (...) {                                                                             \
      ::tessera::detail::write_error(err, n, "unknown exception in constructor");               \
    }                                                                                           \
    return nullptr;                                                                             \
  }                                                                                             \
  void tessera_destroy_method(void* m) noexcept { delete static_cast<::tessera::Method*>(m); }  \
  }                                                                                             \
  extern "C" __attribute__((visibility("default"))) const tessera_plugin_descriptor*            \
  tessera_plugin_entry(void) {                                                                  \
    static const tessera_plugin_descriptor d = {                                                \
        sizeof(tessera_plugin_descriptor), TESSERA_SDK_ABI_MAJOR, TESSERA_TARGET_ABI_MINOR,     \
        Id, Version, Family, Summary, Paper,                                                    \
        {TESSERA_TORCH_VERSION, TESSERA_CXX11_ABI, TESSERA_COMPILER},                           \
        &tessera_create_method, &tessera_destroy_method};                                       \
    return &d;                                                                                  \
  }
