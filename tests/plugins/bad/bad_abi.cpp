// Refused: built for SDK ABI 99.0.
#include <tessera/abi.h>
#include <tessera/fingerprint.h>

extern "C" __attribute__((visibility("default"))) const tessera_plugin_descriptor* tessera_plugin_entry(void) {
  static const tessera_plugin_descriptor d = {sizeof(tessera_plugin_descriptor), 99, 0, "bad-abi", "1.0", "additive", "", "",
                                              {TESSERA_TORCH_VERSION, TESSERA_CXX11_ABI, TESSERA_COMPILER}, nullptr, nullptr};
  return &d;
}
