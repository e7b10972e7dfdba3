#include "formats/torch_pickle.h"

#include <torch/serialize.h>

#include <fstream>
#include <iterator>
#include <stdexcept>

namespace tessera {

std::map<std::string, at::Tensor> read_torch_pickle(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot be read");
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  c10::IValue v;
  try {
    v = torch::pickle_load(bytes);
  } catch (const std::exception& e) {
    const std::string what = e.what();
    // A torch.save file of another kind, a damaged one, or tensors saved on a device this host lacks.
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
