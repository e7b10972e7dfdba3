// Refused: its method's constructor throws.
#include <tessera/plugin.h>

#include <stdexcept>

namespace {
class Throwing final : public tessera::Method {
 public:
  Throwing() { throw std::runtime_error("constructor says no"); }
  tessera::MethodSchema describe() const override { return {}; }
  void attach(tessera::AttachContext&) override {}
  void detach(tessera::ModelView&) override {}
  tessera::NamedTensors trainable() override { return {}; }
  tessera::NamedTensors state() override { return {}; }
  void load_state(const tessera::NamedTensors&) override {}
  std::string adapter_config_json() const override { return "{}"; }
};
}  // namespace

TESSERA_PLUGIN(Throwing, "throwing", "1.0", "additive", "throws", "none")
