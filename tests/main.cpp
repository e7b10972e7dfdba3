// The test runner. With TESSERA_TEST_DEVICE=cuda the CUDA backend is loaded before any
// test seeds a generator (torch decides once whether CUDA exists: see runtime/device.h).
#define CATCH_CONFIG_RUNNER
#define CATCH_CONFIG_PREFIX_ALL
#include "runtime/device.h"

#include <catch2/catch.hpp>

#include <cstdlib>
#include <iostream>

int main(int argc, char** argv) {
  if (const char* d = std::getenv("TESSERA_TEST_DEVICE"); d != nullptr && *d != '\0') {
    try {
      tessera::prepare_device(c10::Device(d));
    } catch (const std::exception& e) {
      std::cerr << "TESSERA_TEST_DEVICE=" << d << ": " << e.what() << "\n";
      return 2;
    }
  }
  return Catch::Session().run(argc, argv);
}
