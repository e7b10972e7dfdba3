// The process groups data-parallel training reduces through (host/train/distributed.h):
// Gloo for a CPU model, NCCL from libtessera_nccl.so for a CUDA one. Runs of several ranks
// are tests/cli/distributed.sh's; a GPU machine runs the NCCL group here for real.
#include "support.h"

#include "runtime/device.h"
#include "train/distributed.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <chrono>

using namespace tessera;

namespace {

// A one-rank group's all-reduce: the tensor comes back as it went in, on its device.
void check_one_rank_sum(c10d::Backend& group, const c10::Device& device) {
  const at::Tensor values = at::tensor({1.5, -2.0, 3.25}, at::kFloat);
  std::vector<at::Tensor> t{values.to(device)};
  group.allreduce(t)->wait();
  CATCH_CHECK(t[0].device() == (device.is_cuda() && !device.has_index() ? c10::Device(c10::kCUDA, 0) : device));
  CATCH_CHECK(at::equal(t[0].cpu(), values));
}

}  // namespace

CATCH_TEST_CASE("process groups: a CPU model reduces through Gloo", "[train][distributed]") {
  auto store = c10::make_intrusive<c10d::HashStore>();
  const auto group = make_process_group(store, 0, 1, std::chrono::seconds(30), c10::Device("cpu"));
  CATCH_CHECK(group->getBackendName() == "gloo");
  check_one_rank_sum(*group, c10::Device("cpu"));
  CATCH_CHECK_THROWS_WITH(make_process_group(store, 0, 1, std::chrono::seconds(1), c10::Device("meta")), Catch::Contains("no c10d backend for it"));
}

CATCH_TEST_CASE("process groups: a CUDA model reduces through NCCL from libtessera_nccl.so", "[train][distributed]") {
  auto store = c10::make_intrusive<c10d::HashStore>();
  if (test::device().is_cuda()) {  // a GPU run: the group is made and reduces
    const auto group = make_process_group(store, 0, 1, std::chrono::seconds(60), test::device());
    CATCH_CHECK(group->getBackendName() == "nccl");
    check_one_rank_sum(*group, test::device());
    return;
  }
#ifdef TESSERA_HAVE_NCCL
  // A GPU this machine lacks (none, here): the module loads with every symbol bound
  // (ProcessGroupNCCL's among them), its entry point runs, and its refusal comes back as an
  // exception naming the backend and the GPU (not an abort, not a missing symbol).
  CATCH_CHECK_THROWS_WITH(make_process_group(store, 0, 2, std::chrono::seconds(1), c10::Device("cuda:127")),
                          Catch::Contains("on cuda:127 through NCCL: this rank's GPU is cuda:127, and torch sees"));
#else
  CATCH_CHECK_THROWS_WITH(make_process_group(store, 0, 2, std::chrono::seconds(1), c10::Device("cuda:127")),
                          Catch::Contains("libtessera_nccl.so, which is built only against a CUDA build"));
#endif
}
