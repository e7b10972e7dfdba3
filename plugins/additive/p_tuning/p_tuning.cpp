// P-tuning (Liu et al. 2021, "GPT Understands, Too", arXiv:2103.10385). The math and every
// key: README.md beside this.
//
//   p = f(E)          E: (T, H) trainable virtual-token embeddings, f: the prompt encoder
//   e = [p_1 ; … ; p_P ; embed(x)]
//
// The virtual tokens are reparameterised by a prompt encoder trained with them, as PEFT's
// PromptEncoder does: MLP  f(E) = W3 relu(W2 relu(W1 E + b1) + b2) + b3  (H → h → h → H), or
// LSTM  f(E) = W2 relu(W1 BiLSTM(E) + b1) + b2  (a bidirectional LSTM over the T rows, then
// 2h → 2h → H). The prompt goes in front of the input at the embedding site (T5: the
// encoder's), the host extending masks, labels and positions.
//
// Files, as PEFT's: `prompt_embeddings` = f(E), (T, H); the encoder's weights are a device of
// training and are not saved. A loaded adapter uses its rows directly (PEFT's inference
// mode); training on from there trains those rows.
#include "../peft_prompt.h"

#include <tessera/plugin.h>

#include <ATen/ATen.h>

#include <cmath>

namespace {

using tessera::Tensor;

// A trainable tensor at PyTorch's default Linear/LSTM initialisation.
Tensor uniform(at::IntArrayRef shape, std::int64_t fan, const c10::TensorOptions& opts) {
  return tessera::peft_prompt::torch_default_uniform(shape, fan, opts).set_requires_grad(true);
}

class PTuning final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    auto params = tessera::peft_prompt::common_params();
    params.push_back({"encoder_reparameterization_type", ParamType::String, std::string("MLP"), "the prompt encoder: MLP or LSTM (bidirectional, then an MLP)",
                      std::nullopt, std::nullopt, {"MLP", "LSTM"}});
    params.push_back({"encoder_hidden_size", ParamType::Int, std::int64_t{0}, "the prompt encoder's hidden size h; 0: the model's hidden size", 0.0,
                      65536.0, {}});
    params.push_back({"encoder_num_layers", ParamType::Int, std::int64_t{2}, "LSTM layers (the MLP has three linear layers, as PEFT's)", 1.0, 8.0, {}});
    params.push_back({"encoder_dropout", ParamType::Float, 0.0, "dropout between LSTM layers in training (the MLP has none, as PEFT's)", 0.0, 1.0, {}});
    return {params};
  }

  void attach(tessera::AttachContext& ctx) override {
    if (!ctx.targets.empty()) throw std::runtime_error("P-tuning has no targets: its prompt goes in front of the input");
    auto* embed = ctx.model.embedding_site();
    if (embed == nullptr) throw std::runtime_error("a " + ctx.model.info().architecture + " model has no embedding site for a prompt");
    model_ = &ctx.model;
    info_ = ctx.model.info();
    P_ = ctx.params.integer("num_virtual_tokens");
    submodules_ = tessera::peft_prompt::submodules(ctx.params, info_);
    layers_ = tessera::peft_prompt::peft_layers(ctx.model);
    lstm_ = ctx.params.text("encoder_reparameterization_type") == "LSTM";
    const auto H = embed->hidden_size();
    hidden_ = ctx.params.integer("encoder_hidden_size") > 0 ? ctx.params.integer("encoder_hidden_size") : H;
    lstm_layers_ = ctx.params.integer("encoder_num_layers");
    dropout_ = ctx.params.number("encoder_dropout");
    const auto& o = info_.param_options;
    const auto T = P_ * submodules_, h = hidden_;
    table_ = at::empty({T, H}, o);
    {
      at::NoGradGuard no_grad;
      table_.normal_();
    }
    table_.set_requires_grad(true);
    auto linear = [&](const std::string& name, std::int64_t in, std::int64_t out) {
      weights_.push_back({name + ".weight", uniform({out, in}, in, o)});
      weights_.push_back({name + ".bias", uniform({out}, in, o)});
    };
    if (lstm_) {
      // Per layer and direction, at::lstm's order: w_ih (4h, in), w_hh (4h, h), b_ih, b_hh.
      for (std::int64_t l = 0; l < lstm_layers_; ++l)
        for (const char* dir : {"", "_reverse"}) {
          const auto in = l == 0 ? H : 2 * h;
          const std::string sfx = std::to_string(l) + dir;
          weights_.push_back({"lstm_head.weight_ih_l" + sfx, uniform({4 * h, in}, h, o)});
          weights_.push_back({"lstm_head.weight_hh_l" + sfx, uniform({4 * h, h}, h, o)});
          weights_.push_back({"lstm_head.bias_ih_l" + sfx, uniform({4 * h}, h, o)});
          weights_.push_back({"lstm_head.bias_hh_l" + sfx, uniform({4 * h}, h, o)});
        }
      linear("mlp_head.0", 2 * h, 2 * h);
      linear("mlp_head.2", 2 * h, H);
    } else {
      linear("mlp_head.0", H, h);
      linear("mlp_head.2", h, h);
      linear("mlp_head.4", h, H);
    }
    const auto P = P_;
    const auto dtype = info_.options.dtype();
    embed->add_prompt(ctx.owner, [this, P, dtype](std::int64_t B) {  // (B, P, H)
      const Tensor p = prompts(model_->training()).narrow(0, 0, P).to(dtype);
      return p.unsqueeze(0).expand({B, P, p.size(1)});
    });
  }

  tessera::NamedTensors trainable() override {
    tessera::NamedTensors out{{"prompt_encoder.embedding.weight", table_}};
    if (!direct_)
      for (const auto& [k, w] : weights_) out["prompt_encoder." + k] = w;
    return out;
  }

  // PEFT's file: the encoder's output.
  tessera::NamedTensors state() override {
    at::NoGradGuard no_grad;
    return {{"prompt_embeddings", direct_ ? table_ : prompts(/*train=*/false).detach()}};  // no dropout draw
  }

  void load_state(const tessera::NamedTensors& tensors) override {
    tessera::peft_prompt::load_table(tensors, table_, P_, submodules_);
    direct_ = true;  // the rows are the encoder's output now: it is not run again
  }

  std::string adapter_config_json() const override {
    auto j = tessera::peft_prompt::config("P_TUNING", info_, P_, submodules_, layers_, info_.num_heads, info_.hidden_size);
    j["encoder_reparameterization_type"] = lstm_ ? "LSTM" : "MLP";
    j["encoder_hidden_size"] = hidden_;
    j["encoder_num_layers"] = lstm_layers_;
    j["encoder_dropout"] = dropout_;
    return j.dump(2);
  }

 private:
  const Tensor& w(std::size_t i) const { return weights_[i].second; }

  // The T prompt rows: f(E), or E itself once an adapter's output was loaded. (T, H) f32.
  // train: the LSTM's dropout between layers is drawn.
  Tensor prompts(bool train) const {
    if (direct_) return table_;
    std::size_t i = 0;
    Tensor x = table_;
    if (lstm_) {
      const auto h = hidden_;
      const Tensor zeros = at::zeros({2 * lstm_layers_, 1, h}, table_.options());
      std::vector<Tensor> params;
      for (; i < static_cast<std::size_t>(8 * lstm_layers_); ++i) params.push_back(w(i));
      x = std::get<0>(at::lstm(x.unsqueeze(0), {zeros, zeros}, params, /*has_biases=*/true, lstm_layers_, dropout_, train,
                               /*bidirectional=*/true, /*batch_first=*/true))
              .squeeze(0);  // (T, 2h)
      x = at::relu(at::linear(x, w(i), w(i + 1)));
      return at::linear(x, w(i + 2), w(i + 3));
    }
    x = at::relu(at::linear(x, w(0), w(1)));
    x = at::relu(at::linear(x, w(2), w(3)));
    return at::linear(x, w(4), w(5));
  }

  tessera::ModelView* model_ = nullptr;
  tessera::ModelInfo info_;
  std::int64_t P_ = 0, submodules_ = 1, layers_ = 0, hidden_ = 0, lstm_layers_ = 2;
  double dropout_ = 0.0;
  bool lstm_ = false, direct_ = false;
  Tensor table_;                                      // E: (T, H) f32 master
  std::vector<std::pair<std::string, Tensor>> weights_;  // the encoder's, PEFT's names
};

}  // namespace

TESSERA_PLUGIN(PTuning, "p_tuning", "1.0.0", "additive",
               "Virtual-token embeddings reparameterised by an MLP or LSTM prompt encoder, in front of the input (P-tuning)",
               "Liu et al. 2021, GPT Understands, Too, arXiv:2103.10385")
