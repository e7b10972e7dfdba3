// The CUDA half of libtorch is loaded only when a run asks for a CUDA device.
#include "support.h"

#include "runtime/device.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdlib>
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

// An environment variable set for a scope, then put back as it was.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* was = std::getenv(name);
    had_ = was != nullptr;
    if (had_) was_ = was;
    ::setenv(name, value, 1);
  }
  ~ScopedEnv() { had_ ? (void)::setenv(name_, was_.c_str(), 1) : (void)::unsetenv(name_); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  bool had_ = false;
  std::string was_;
};

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

CATCH_TEST_CASE("rank_device: device 'cuda' in a data-parallel run is the GPU of LOCAL_RANK", "[runtime][device]") {
  const ScopedEnv world("WORLD_SIZE", "4"), local("LOCAL_RANK", "3");
  CATCH_CHECK(rank_device("cuda") == c10::Device("cuda:3"));
  CATCH_CHECK(rank_device("cuda:1") == c10::Device("cuda:1"));  // named: kept
  CATCH_CHECK(rank_device("cpu") == c10::Device("cpu"));
  {
    const ScopedEnv alone("WORLD_SIZE", "1");
    CATCH_CHECK(rank_device("cuda") == c10::Device("cuda"));
  }
  const ScopedEnv bad("LOCAL_RANK", "three");
  CATCH_CHECK_THROWS_WITH(rank_device("cuda"), Catch::Contains("LOCAL_RANK=three is not a GPU index"));
}
