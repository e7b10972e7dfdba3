// The distillation task (CoDA's adaptation phase): the teacher is the base model alone —
// transformers' own hidden states for the reference inputs — the student the model with its
// methods, the loss their mean squared difference over real tokens; training lowers it.
#include "support.h"

#include "train/trainer.h"

#include <fstream>

using namespace tessera;

namespace {

Config distillation_config(const std::filesystem::path& dir, const std::string& k, std::int64_t epochs) {
  std::ofstream(dir / "run.toml") << R"([model]
path = "${TESSERA_MODEL_DIR}"
[data]
path = "${TESSERA_DATA_DIR}/polarity.csv"
text_column = "text"
max_length = 32
limit = 240
[task]
kind = "distillation"
[train]
epochs = )" + std::to_string(epochs) + R"(
batch_size = 16
lr = 3e-3
threads = 0
[[methods]]
plugin = "coda"
name = "coda"
[methods.params]
k = )" + k + "\n";
  Config c = load_config((dir / "run.toml").string());
  check_methods(c, test::registry());
  c.output_dir = (dir / "run").string();
  c.model.device = test::device().str();
  return c;
}

}  // namespace

CATCH_TEST_CASE("distillation: the teacher is the base model alone (transformers' states), the loss their mean squared difference, gradients reach the method only", "[train][distillation][minilm]") {
  set_threads(0);
  auto& ref = test::cached_tensors(test::fixture("reference.safetensors"));
  const auto &ids = ref["input_ids"], &mask = ref["attention_mask"];
  auto dir = test::temp_dir("distill-loss");
  Session s(distillation_config(dir, "0.25", 1), test::registry());
  CATCH_CHECK(std::string(s.task().kind()) == "distillation");
  s.model().train(false);  // no dropout: the student's states are those of encode() below
  Batch b;
  b.ids = ids.to(s.model().info().options.device()), b.mask = mask.to(b.ids.device());
  const Tensor loss = s.task().forward(b).loss;
  Tensor student;
  {
    at::NoGradGuard no_grad;
    student = s.backbone().encode(ids, mask).hidden;  // CoDA on again after the teacher's pass
  }
  const Tensor m = mask.unsqueeze(-1).to(at::kFloat);
  const Tensor expect = ((student.to(at::kFloat) - ref["hidden"]).pow(2) * m).sum() / (m.sum() * student.size(-1));
  CATCH_CHECK(expect.item<double>() > 1e-3);  // routing a quarter of the tokens moves the states
  CATCH_CHECK(std::abs(loss.item<double>() - expect.item<double>()) < 1e-4 * expect.item<double>());
  loss.backward();
  // Every router and every adapter's up-projection learns (the down-projections wait for the
  // up-projections to leave their zero start).
  std::int64_t learning = 0;
  for (const auto& [name, t] : s.methods().named_trainable())
    if (name.find("router") != std::string::npos || name.find("adapter_up") != std::string::npos) {
      CATCH_INFO(name);
      CATCH_CHECK((t.grad().defined() && t.grad().abs().sum().item<double>() > 0));
      ++learning;
    }
  CATCH_CHECK(learning == 6 * 3);
  for (auto* p : s.model().parameter_sites()) CATCH_CHECK_FALSE(ParameterSiteImpl::of(*p).base().requires_grad());

  // At k = 1 CoDA installs no router and its adapters start silent: student = teacher.
  auto dense = test::temp_dir("distill-dense");
  Session d(distillation_config(dense, "1.0", 1), test::registry());
  const EvalResult r = d.task().evaluate(Split::Test);
  CATCH_CHECK(r.loss < 1e-10);
  CATCH_CHECK(r.accuracy > 1 - 1e-5);  // the mean cosine
}

CATCH_TEST_CASE("distillation training brings the routed model toward the dense one, and fine-tuning starts from its adapter", "[train][distillation][minilm]") {
  set_threads(0);
  auto dir = test::temp_dir("distill-train");
  Config c = distillation_config(dir, "0.25", 2);
  EvalResult before, after;
  {
    Session s(c, test::registry());
    before = s.task().evaluate(Split::Test);
    train(s, c.output_dir);
    after = s.task().evaluate(Split::Test);
  }
  CATCH_CHECK(after.loss < 0.95 * before.loss);
  CATCH_CHECK(after.accuracy > before.accuracy);
  // Fine-tuning loads the adapted routers and adapters (`load`), not fresh ones.
  Config f = c;
  f.task.kind = "sequence-classification";
  f.data.label_column = "label";
  f.methods[0].load = c.output_dir + "/adapter/coda";
  Session tuned(f, test::registry());
  const auto adapted = test::read_tensors(c.output_dir + "/adapter/coda/adapter_model.safetensors");
  const auto now = tuned.methods()[0].call("state", [](Method& x) { return x.state(); });
  CATCH_CHECK(now.size() == adapted.size());
  for (const auto& [k, t] : adapted) CATCH_CHECK(at::equal(now.at(k).cpu(), t));
}
