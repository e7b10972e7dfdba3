// Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
// Generation", arXiv:2101.00190) and, without the reparameterisation, P-tuning v2 (Liu et
// al. 2022, arXiv:2110.07602). The math and every key: README.md beside this.
//
//   Z = E                              E: (P, 2 L d) trainable     (prefix_projection = false)
//   Z = W2 tanh(W1 E' + b1) + b2       E': (P, e), W1: (h, e), W2: (2 L d, h)   (= true)
//   layer l:  K = [Z_K(l) ; K],  V = [Z_V(l) ; V]      Z row p = (2L, kv heads, head_dim)
//
// d = kv heads × head dim (grouped-query models keep one prefix per key/value head), L the
// layers PEFT counts, e = d (peft's) or the model's hidden size (AdapterHub's, embedding_width). Each layer's keys and values get P more in front, at the attention
// site: the host extends the masks and numbers the tokens after the prefix, as transformers
// does for past key values (shift_positions = false: from 0, as AdapterHub's prefix; SDK 2.8's
// positionless prefix); in generation the KV cache holds the prefix once.
// T5, as PEFT 0.21 lays it out: the decoder's self-attention only, decoder layer i reading
// rows 4i mod 2L (keys) and 4i + 1 mod 2L (values) of the table of the L encoder layers.
// Files, as PEFT's: `prompt_embeddings` = Z, (P, 2 L d); a loaded adapter uses Z directly.
#include "../peft_prompt.h"

#include <tessera/extensions.h>
#include <tessera/plugin.h>

#include <ATen/ATen.h>

#include <cmath>

namespace {

using tessera::Tensor;

using tessera::peft_prompt::torch_default_uniform;

class PrefixTuning final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    auto params = tessera::peft_prompt::common_params();
    params.push_back({"prefix_projection", ParamType::Bool, false,
                      "true: the prefix is an MLP's output (Li & Liang's reparameterisation); false: trained directly (P-tuning v2)", std::nullopt,
                      std::nullopt, {}});
    params.push_back({"encoder_hidden_size", ParamType::Int, std::int64_t{0}, "the projection's hidden size h; 0: d (kv heads × head dim)", 0.0,
                      65536.0, {}});
    params.push_back({"embedding_width", ParamType::String, std::string("kv"),
                      "with a projection, the width e of its input table E': \"kv\" = d (kv heads × head dim, peft's), \"hidden\" = the model's "
                      "hidden size (AdapterHub's); the two differ on grouped-query models",
                      std::nullopt, std::nullopt, {"kv", "hidden"}});
    params.push_back({"shift_positions", ParamType::Bool, true,
                      "true: the tokens are numbered after the prefix, as transformers numbers them after past key values (peft); false: from 0, "
                      "as without it (AdapterHub's prefix tuning, MAM, UniPELT)",
                      std::nullopt, std::nullopt, {}});
    params.push_back({"init_weights", ParamType::String, std::string(), "\"zero\": the prefix starts at 0 (the projection's last layer, or the table)",
                      std::nullopt, std::nullopt, {"", "zero"}});
    return {params};
  }

  void validate(const tessera::Params& p) const override {
    if (p.text("embedding_width") == "hidden" && !p.flag("prefix_projection"))
      throw tessera::ParamError("embedding_width", "embedding_width = \"hidden\" is the projection's input: it needs prefix_projection = true");
  }

  void attach(tessera::AttachContext& ctx) override {
    if (!ctx.targets.empty()) throw std::runtime_error("prefix tuning has no targets: PEFT's prefix goes to every layer");
    info_ = ctx.model.info();
    const bool t5 = info_.architecture == "t5";
    for (auto* a : ctx.model.attention_sites()) {
      const auto& n = a->name();
      const bool self = n.size() > 5 && n.compare(n.size() - 5, 5, ".attn") == 0;
      if (self && (!t5 || n.rfind("decoder.", 0) == 0)) sites_.push_back(a);
    }
    if (sites_.empty()) throw std::runtime_error("a " + info_.architecture + " model has no self-attention site for a prefix");
    L_ = tessera::peft_prompt::peft_layers(ctx.model);
    // PEFT builds one cache layer per encoder layer: a deeper decoder has no prefix there.
    if (static_cast<std::int64_t>(sites_.size()) > L_)
      throw std::runtime_error("PEFT's T5 prefix covers decoders of at most the encoder's " + std::to_string(L_) + " layers, this one has " +
                               std::to_string(sites_.size()));
    heads_ = sites_[0]->num_heads(), head_dim_ = sites_[0]->head_dim(), d_ = heads_ * head_dim_;
    // PEFT sizes the prefix by d_model / heads, T5's attention by d_kv: where they differ
    // (t5-3b, t5-11b) the prefix works here, laid out by d_kv, but no PEFT folder fits.
    if (t5 && d_ != info_.hidden_size)
      tessera::log(ctx.model, TESSERA_LOG_WARN, ctx.instance,
                   "this T5 has num_heads × d_kv = " + std::to_string(heads_) + " × " + std::to_string(head_dim_) + " ≠ d_model " +
                       std::to_string(info_.hidden_size) + ": the prefix is laid out by d_kv, and PEFT (which sizes it by d_model / heads) cannot load the folder");
    P_ = ctx.params.integer("num_virtual_tokens");
    submodules_ = tessera::peft_prompt::submodules(ctx.params, info_);
    projection_ = ctx.params.flag("prefix_projection");
    shift_ = ctx.params.flag("shift_positions");
    hidden_ = ctx.params.integer("encoder_hidden_size") > 0 ? ctx.params.integer("encoder_hidden_size") : d_;
    zero_ = ctx.params.text("init_weights") == "zero";
    validate(ctx.params);
    const std::int64_t e = ctx.params.text("embedding_width") == "hidden" ? info_.hidden_size : d_;
    const auto& o = info_.param_options;
    const auto width = 2 * L_ * d_;
    {
      at::NoGradGuard no_grad;
      table_ = at::empty({P_, projection_ ? e : width}, o).normal_();
      if (projection_) {
        weights_ = {torch_default_uniform({hidden_, e}, e, o), torch_default_uniform({hidden_}, e, o), torch_default_uniform({width, hidden_}, hidden_, o),
                    torch_default_uniform({width}, hidden_, o)};
        if (zero_) weights_[2].zero_(), weights_[3].zero_();
      } else if (zero_) {
        table_.zero_();
      }
    }
    table_.set_requires_grad(true);
    for (auto& w : weights_) w.set_requires_grad(true);
    for (std::size_t i = 0; i < sites_.size(); ++i) {
      const auto I = static_cast<std::int64_t>(i);
      // PEFT's rows of layer i: 2i, 2i + 1; on T5 (its key/value blocks doubled, the cross
      // halves dropped) 4i mod 2L, 4i + 1 mod 2L.
      const auto k_row = t5 ? (4 * I) % (2 * L_) : 2 * I, v_row = k_row + 1;
      tessera::KVPrefix prefix = [this, i, k_row, v_row](std::int64_t B) {
        // One evaluation per forward: the first layer's call computes Z for all of them.
        if (i == 0 || !current_.defined()) current_ = layout(rows());
        auto at_row = [&](std::int64_t r) { return current_.select(1, r).transpose(0, 1).unsqueeze(0).expand({B, heads_, P_, head_dim_}); };
        return std::make_pair(at_row(k_row), at_row(v_row));  // (B, heads, P, head_dim) each
      };
      if (shift_) sites_[i]->add_prefix(ctx.owner, std::move(prefix));
      else sites_[i]->add_positionless_prefix(ctx.owner, std::move(prefix));
    }
  }

  void detach(tessera::ModelView&) override { current_ = Tensor(); }

  tessera::NamedTensors trainable() override {
    tessera::NamedTensors out{{"prompt_encoder.embedding.weight", table_}};
    if (projection_ && !direct_) {
      out["prompt_encoder.transform.0.weight"] = weights_[0], out["prompt_encoder.transform.0.bias"] = weights_[1];
      out["prompt_encoder.transform.2.weight"] = weights_[2], out["prompt_encoder.transform.2.bias"] = weights_[3];
    }
    return out;
  }

  // PEFT's file: Z.
  tessera::NamedTensors state() override {
    at::NoGradGuard no_grad;
    return {{"prompt_embeddings", rows().detach()}};
  }

  // With a projection the loaded Z replaces the table (a new tensor, (P, 2 L d)): trainable()
  // lists it from here on, as the host reads it again before any training.
  void load_state(const tessera::NamedTensors& tensors) override {
    const std::vector<std::int64_t> shape{P_, 2 * L_ * d_};
    const auto& t = tessera::peft_prompt::checked_embeddings(tensors, shape, std::to_string(P_) + " virtual tokens",
                                                             "2 × " + std::to_string(L_) + " layers × " + std::to_string(heads_) + " kv heads × " +
                                                                 std::to_string(head_dim_) + " head dim");
    at::NoGradGuard no_grad;
    if (projection_) table_ = at::empty(shape, info_.param_options);  // the projection's output replaces it
    table_.copy_(t);
    table_.set_requires_grad(true);
    direct_ = true;
    current_ = Tensor();
  }

  std::string adapter_config_json() const override {
    auto j = tessera::peft_prompt::config("PREFIX_TUNING", info_, P_, submodules_, L_, heads_, d_);
    j["prefix_projection"] = projection_;
    j["encoder_hidden_size"] = hidden_;
    j["init_weights"] = zero_ ? nlohmann::json("zero") : nlohmann::json(nullptr);
    if (!shift_) j["shift_positions"] = false;  // Tessera's key, written only where peft's numbering is not what it means
    return j.dump(2);
  }

 private:
  // Z: (P, 2 L d) f32.
  Tensor rows() const {
    if (!projection_ || direct_) return table_;
    return at::linear(at::tanh(at::linear(table_, weights_[0], weights_[1])), weights_[2], weights_[3]);
  }

  // (P, 2L · d) -> (P, 2L, heads, head_dim) in the model's dtype.
  Tensor layout(const Tensor& z) const { return z.to(info_.options.dtype()).view({P_, 2 * L_, heads_, head_dim_}); }

  tessera::ModelInfo info_;
  std::vector<tessera::AttentionSite*> sites_;
  std::int64_t L_ = 0, heads_ = 0, head_dim_ = 0, d_ = 0, P_ = 0, submodules_ = 1, hidden_ = 0;
  bool projection_ = false, zero_ = false, direct_ = false, shift_ = true;
  Tensor table_;                 // E (P, 2L d) or E' (P, e), f32 master
  std::vector<Tensor> weights_;  // W1, b1, W2, b2 with a projection
  Tensor current_;               // this forward's Z, laid out: (P, 2L, heads, head_dim)
};

}  // namespace

TESSERA_PLUGIN(PrefixTuning, "prefix_tuning", "1.0.0", "additive",
               "Trainable key/value prefixes in every layer's self-attention, optionally through an MLP (prefix tuning, P-tuning v2)",
               "Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation, arXiv:2101.00190; Liu et al. 2022, P-Tuning v2, arXiv:2110.07602")
