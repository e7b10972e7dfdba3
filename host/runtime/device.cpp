#include "runtime/device.h"

#include <ATen/Context.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <dlfcn.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <stdexcept>
#include <string>

namespace tessera {
namespace {

// The directory of the libtorch this process runs (the wheel's torch/lib).
std::filesystem::path torch_lib_dir() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&c10::GetCPUAllocator), &info) == 0 || info.dli_fname == nullptr)
    throw std::runtime_error("cannot tell where libtorch was loaded from");
  return std::filesystem::path(info.dli_fname).parent_path();
}

// A rank of a data-parallel run (torchrun's WORLD_SIZE above 1): it owns one GPU.
bool data_parallel_rank() {
  const char* world = std::getenv("WORLD_SIZE");
  return world != nullptr && std::atoll(world) > 1;
}

}  // namespace

void prepare_device(const c10::Device& device) {
  if (device.is_cpu()) return;
  if (!device.is_cuda()) throw std::runtime_error("device '" + device.str() + "' is not supported (cpu or cuda)");
  static std::once_flag once;
  static std::string error;
  std::call_once(once, [] {
    const auto lib = torch_lib_dir() / "libtorch_cuda.so";
    // RTLD_GLOBAL: its symbols serve libraries loaded later, as if it had been linked.
    if (dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
      const char* why = dlerror();
      error = "device 'cuda' needs " + lib.string() + " (the torch wheel's CUDA build): " + (why != nullptr ? why : "not loadable");
    }
  });
  if (!error.empty()) throw std::runtime_error(error);
  if (!at::hasCUDA())
    throw std::runtime_error("device '" + device.str() + "': libtorch_cuda is loaded but torch sees no CUDA device (no NVIDIA driver or GPU here)");
  if (device.has_index()) {
    const auto gpus = at::getNumGPUs();
    if (static_cast<std::size_t>(device.index()) >= gpus)
      throw std::runtime_error("device '" + device.str() + "': torch sees " + std::to_string(gpus) + " CUDA device" + (gpus == 1 ? "" : "s") +
                               " here (a data-parallel rank's 'cuda' is cuda:LOCAL_RANK: one GPU a rank)");
    // A data-parallel rank owns one GPU: it becomes the current device too, as a torchrun
    // script sets it first, so whatever uses the current device (new streams, NCCL's
    // communicators) is on it. Another process keeps its current device as it is.
    if (data_parallel_rank()) c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->setDevice(device);
  }
  // float32 is float32 on every device: torch leaves cuBLAS's TF32 off but turns cuDNN's on
  // (its RNNs and convolutions then round inputs to 10 mantissa bits), which put P-tuning's
  // LSTM encoder ~1e-3 (relative) off the CPU's result. A run that wants that speed trains
  // in bf16 instead.
  at::globalContext().setAllowTF32CuDNN(false);
}

c10::Device rank_device(const std::string& configured) {
  c10::Device device(configured);
  const char* local = std::getenv("LOCAL_RANK");
  if (!device.is_cuda() || device.has_index() || local == nullptr || !data_parallel_rank()) return device;
  char* end = nullptr;
  const long index = std::strtol(local, &end, 10);
  if (end == local || *end != '\0' || index < 0 || index > 127)
    throw std::runtime_error("LOCAL_RANK=" + std::string(local) + " is not a GPU index (device 'cuda' in a data-parallel run takes this rank's LOCAL_RANK)");
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
}

}  // namespace tessera
