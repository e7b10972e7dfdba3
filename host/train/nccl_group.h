// The contract between the host and libtessera_nccl.so, the module that makes c10d's NCCL
// process group. ProcessGroupNCCL lives in the wheel's libtorch_cuda, which the host does
// not link (host/runtime/device.h says why), so NCCL comes in a module of its own, loaded
// only by a data-parallel run on CUDA. Plain C types cross the boundary; both sides run
// the same libtorch, so the group comes back as a c10d::Backend the host takes ownership of.
#pragma once

#include "train/c10d_fwd.h"

namespace tessera {

struct NcclGroupRequest {
  c10d::Store* store = nullptr;  // borrowed: the module takes its own reference
  int rank = 0, world = 1;
  int device_index = 0;          // this rank's GPU
  long long timeout_ms = 300000;
  c10d::Backend* group = nullptr;  // out: one reference, for the host to reclaim
  char error[1024] = {};           // out: why not, when the call returns non-zero
};

// extern "C" int tessera_make_nccl_group_v1(NcclGroupRequest*): 0 on success.
using MakeNcclGroup = int (*)(NcclGroupRequest*);
inline constexpr const char* kMakeNcclGroupSymbol = "tessera_make_nccl_group_v1";
inline constexpr const char* kNcclModuleName = "libtessera_nccl.so";

}  // namespace tessera
