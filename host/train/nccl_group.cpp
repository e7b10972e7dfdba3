// libtessera_nccl.so: c10d's NCCL process group for the host (train/nccl_group.h). Built
// only against a CUDA build of the torch wheel, which ships ProcessGroupNCCL in libtorch_cuda
// and NCCL's headers and library in its nvidia-nccl dependency.
#include "train/nccl_group.h"

#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <chrono>
#include <cstdio>
#include <exception>

extern "C" __attribute__((visibility("default"))) int tessera_make_nccl_group_v1(tessera::NcclGroupRequest* r) {
  try {
    const int gpus = c10::cuda::device_count();  // 0, not an error, without a driver or GPU
    if (r->device_index < 0 || r->device_index >= gpus) {
      std::snprintf(r->error, sizeof r->error, "this rank's GPU is cuda:%d, and torch sees %d CUDA device%s here", r->device_index, gpus,
                    gpus == 1 ? "" : "s");
      return 1;
    }
    // NCCL's communicators are made on the current device.
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(r->device_index));
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = std::chrono::milliseconds(r->timeout_ms);
    auto store = c10::intrusive_ptr<c10d::Store>::unsafe_reclaim_from_nonowning(r->store);
    auto group = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, r->rank, r->world, options);
    // Bound to this rank's GPU: collectives without a tensor of their own (barrier) use it,
    // rather than a guess from the rank's number.
    group->setBoundDeviceId(c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(r->device_index)));
    r->group = group.release();
    return 0;
  } catch (const c10::Error& e) {  // torch's reason, without its C++ backtrace
    std::snprintf(r->error, sizeof r->error, "%s", e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::snprintf(r->error, sizeof r->error, "%s", e.what());
  } catch (...) {
    std::snprintf(r->error, sizeof r->error, "an exception that is not a std::exception");
  }
  return 1;
}
