// Site kind: embedding. P trainable vectors prepended to every sequence
// (EmbeddingSite::add_prompt); the same P on every call. An example of the SDK, not the
// shipped prompt tuning.
#include <tessera/plugin.h>
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

namespace {
class SoftPrompt final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    return {{{"num_virtual_tokens", tessera::ParamType::Int, std::int64_t{10}, "prompt length P", 1.0, std::nullopt, {}}}};
  }

  void attach(tessera::AttachContext& ctx) override {
    auto* site = ctx.model.embedding_site();
    if (site == nullptr) throw std::runtime_error("the model has no embedding site");
    const auto P = ctx.params.integer("num_virtual_tokens");
    prompt_ = (at::randn({P, site->hidden_size()}, ctx.model.info().param_options) * 0.02).set_requires_grad(true);
    auto prompt = prompt_;
    auto* model = &ctx.model;
    site->add_prompt(ctx.owner, [prompt, model](std::int64_t batch) {
      return prompt.to(model->info().options.dtype()).unsqueeze(0).expand({batch, -1, -1});
    });
  }

  tessera::NamedTensors trainable() override { return {{"prompt_embeddings", prompt_}}; }
  tessera::NamedTensors state() override { return {{"prompt_embeddings", prompt_}}; }
  void load_state(const tessera::NamedTensors& t) override {
    at::NoGradGuard no_grad;
    prompt_.copy_(t.at("prompt_embeddings"));
  }
  std::string adapter_config_json() const override { return R"({"peft_type": "EXAMPLE_SOFT_PROMPT"})"; }

 private:
  tessera::Tensor prompt_;
};
}  // namespace

TESSERA_PLUGIN(SoftPrompt, "example-soft-prompt", "0.1.0", "additive", "example: trainable vectors before the text (embedding site)", "none (an SDK example, docs/writing-a-plugin.md)")
