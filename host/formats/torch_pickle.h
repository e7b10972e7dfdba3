// State dicts that Python's torch.save wrote (the zip format every torch since 1.6 writes):
// AdapterHub's pytorch_adapter.bin and PEFT's adapter_model.bin, for adapters saved without
// safetensors. Read by libtorch's own unpickler, which builds tensors, strings and
// containers only — it runs no code from the file. Tensors land on the CPU whatever device
// they were saved from (the caller moves them).
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>

namespace tessera {

// name -> tensor; refuses, naming the file, anything but a dict of strings to tensors.
std::map<std::string, at::Tensor> read_torch_pickle(const std::string& path);

}  // namespace tessera
