// Refused: claims another libtorch.
#include <tessera/abi.h>
#include <tessera/fingerprint.h>

extern "C" __attribute__((visibility("default"))) const tessera_plugin_descriptor* tessera_plugin_entry(void) {
  static const tessera_plugin_descriptor d = {sizeof(tessera_plugin_descriptor), TESSERA_SDK_ABI_MAJOR, TESSERA_SDK_ABI_MINOR,
                                              "bad-torch", "1.0", "additive", "", "", {"0.0.1", TESSERA_CXX11_ABI, TESSERA_COMPILER},
                                              nullptr, nullptr};
  return &d;
}
