// The CUDA half of libtorch is loaded only when a run asks for a CUDA device.
#include "support.h"

#include "runtime/device.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <fstream>
#include <sstream>

using namespace tessera;

namespace {

bool cuda_library_mapped() {
  std::ifstream maps("/proc/self/maps");
  std::stringstream all;
  all << maps.rdbuf();
  return all.str().find("libtorch_cuda.so") != std::string::npos;
}

bool cuda_kernels_registered() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("aten::add", "Tensor").hasKernelForDispatchKey(c10::DispatchKey::CUDA);
}

}  // namespace

CATCH_TEST_CASE("libtorch_cuda is loaded only when a run asks for a CUDA device", "[runtime][device]") {
  CATCH_CHECK_NOTHROW(prepare_device(c10::Device("cpu")));
  CATCH_CHECK_THROWS_WITH(prepare_device(c10::Device("meta")), Catch::Contains("device 'meta' is not supported"));
  if (test::device().is_cuda()) {  // a GPU run: the test runner loaded it first
    CATCH_CHECK(cuda_library_mapped());
    CATCH_CHECK(at::hasCUDA());
    return;
  }
  CATCH_CHECK(!cuda_library_mapped());  // a CPU process never maps it
  CATCH_CHECK(!cuda_kernels_registered());
  try {
    prepare_device(c10::Device("cuda"));
    CATCH_CHECK(at::hasCUDA());  // this machine has a GPU after all
  } catch (const std::exception& e) {
    CATCH_CHECK_THAT(std::string(e.what()), Catch::Contains("torch sees no CUDA device"));
  }
  // Loaded now, either way: its kernels joined the dispatcher.
  CATCH_CHECK(cuda_library_mapped());
  CATCH_CHECK(cuda_kernels_registered());
}
