// Refused descriptors of an otherwise well-built plugin, one per build (BAD_KIND):
//   1  newer_minor      a newer SDK minor than the host's, with the larger descriptor that
//                       minor would have (fields appended after the 2.0 ones)
//   2  unknown_family   a family outside the five
//   3  small_descriptor struct_size below the 2.0 descriptor's
#include <tessera/abi.h>
#include <tessera/fingerprint.h>

namespace {
struct Grown {
  tessera_plugin_descriptor d;
  const void* (*later_field)(const char*);  // what a later minor might append
};
}  // namespace

extern "C" __attribute__((visibility("default"))) const tessera_plugin_descriptor* tessera_plugin_entry(void) {
  const bool newer = BAD_KIND == 1;
  static const Grown g = {
      {newer ? static_cast<uint32_t>(sizeof(Grown)) : BAD_KIND == 3 ? 8u : static_cast<uint32_t>(sizeof(tessera_plugin_descriptor)),
       TESSERA_SDK_ABI_MAJOR, TESSERA_SDK_ABI_MINOR + (newer ? 1u : 0u), "bad-descriptor", "1.0",
       BAD_KIND == 2 ? "magic" : "additive", "", "", {TESSERA_TORCH_VERSION, TESSERA_CXX11_ABI, TESSERA_COMPILER}, nullptr, nullptr},
      nullptr};
  return &g.d;
}
