#include "formats/torch_pickle.h"

#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/import_read.h>

#include <fstream>
#include <stdexcept>

namespace tessera {

std::map<std::string, at::Tensor> read_torch_pickle(const std::string& path) {
  if (!std::ifstream(path, std::ios::binary)) throw std::runtime_error(path + ": cannot be read");
  c10::IValue v;
  try {
    // torch.load's archive layout (data.pkl and data/<storage>), every storage mapped to the
    // CPU: an adapter saved from GPU tensors loads on a host without one.
    caffe2::serialize::PyTorchStreamReader reader(path);
    v = torch::jit::readArchiveAndTensors("data", "", "", std::nullopt, std::nullopt, at::Device(at::kCPU), reader);
  } catch (const std::exception& e) {
    const std::string what = e.what();
    // Not torch.save's zip format, damaged, or another kind of object.
    throw std::runtime_error(path + ": cannot be read as a torch.save state dict here (" + what.substr(0, what.find('\n')) + ")");
  }
  if (!v.isGenericDict()) throw std::runtime_error(path + ": holds a " + v.tagKind() + ", not a dict of tensors");
  std::map<std::string, at::Tensor> out;
  for (const auto& e : v.toGenericDict()) {
    if (!e.key().isString()) throw std::runtime_error(path + ": a key of the dict is a " + e.key().tagKind() + ", not a name");
    const std::string name = e.key().toStringRef();
    if (!e.value().isTensor()) throw std::runtime_error(path + ": '" + name + "' is a " + e.value().tagKind() + ", not a tensor");
    out[name] = e.value().toTensor();
  }
  return out;
}

}  // namespace tessera
