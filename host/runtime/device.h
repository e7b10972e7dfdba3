// The compute device a run asks for, made ready before any tensor or generator touches it.
//
// The torch wheel splits libtorch into libtorch_cpu and libtorch_cuda (with cuBLAS, cuDNN,
// NCCL … behind it). Linking the CUDA half makes every process load it: ~230 MB of
// resident memory on a machine that has no GPU at all. Tessera links libtorch_cpu alone
// and loads libtorch_cuda (from beside libtorch_cpu) the first time a run asks for a CUDA
// device; its kernels then register with the dispatcher like any late-loaded op library.
// Call it before anything queries CUDA (at::manual_seed does): torch caches the answer.
#pragma once

#include <c10/core/Device.h>

#include <string>

namespace tessera {

// CPU: nothing. CUDA: loads the backend once; throws naming the library and the loader's
// reason when the wheel has none, or when torch then sees no CUDA device.
void prepare_device(const c10::Device& device);

// The device a run's config names, as this process uses it: "cuda" without an index in a
// data-parallel run (WORLD_SIZE > 1) is the GPU of this rank's LOCAL_RANK, as torchrun's
// scripts pick it (one rank per GPU); anything else is what it says.
c10::Device rank_device(const std::string& configured);

}  // namespace tessera
