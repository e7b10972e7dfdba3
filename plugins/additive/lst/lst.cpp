// LST — Ladder Side-Tuning (Sung, Cho, Bansal 2022, "LST: Ladder Side-Tuning for Parameter
// and Memory Efficient Transfer Learning", arXiv:2206.06522), as its authors' code runs it:
// a side network r times narrower than the backbone, its blocks initialised from the
// backbone's own weights pruned, fed through gated ladders from every backbone layer, and
// its output (up-projected) replacing the backbone's before the task head. Nothing inside
// the backbone is trained, so the backbone builds no autograd graph: the method's point.
// The math and every key: README.md beside this.
//
//   s_0 = W_0↓ x_0 + b_0↓                                   x_0: the embeddings (B, T, H)
//   for layer i:  μ_i = σ(α_i / T)
//                 s   = μ_i s + (1 − μ_i)(W_i↓ h_i + b_i↓)    h_i: backbone layer i's output
//                 s   = SideBlock_i(s)                       the backbone's block kind, width H / r
//   output = W↑ s + b↑        (post-norm BERT)               (B, T, H), read by the task head
//   output = W↑ Norm(s) + b↑  (pre-norm decoders: GPT-2, LLaMA family)
//
// T5 (the authors' own setting): a side encoder and a side decoder, each with its own
// ladders, gates, relative position bias and final norm; the side decoder cross-attends to
// the side encoder's output, and W↑ of the side decoder's replaces the decoder's output.
#include "pruning.h"

#include <tessera/dropout.h>
#include <tessera/plugin.h>
#include <tessera/state.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <memory>

namespace {

using tessera::Tensor;

using tessera::lst::Pruner;
using tessera::lst::top_rows;

// One side network's own tensors: T5 has one per stack.
struct Stack {
  std::string prefix;                                  // in state names: "", or T5's "encoder." / "decoder."
  std::pair<Tensor, Tensor> first;                     // the first ladder: (d, H), (d)
  std::vector<std::pair<Tensor, Tensor>> downs;        // per layer: (d, H), (d)
  std::vector<Tensor> gates;                           // per layer: α (1)
  std::vector<std::map<std::string, Tensor>> blocks;   // per layer: the side block's tensors
  std::map<std::string, Tensor> final_norm;            // pre-norm blocks: the side's final norm (d)
  Tensor bias;                                         // T5: the side's relative position bias (buckets, heads)
};

class Lst final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    return {{
        {"reduction_factor", ParamType::Int, std::int64_t{8}, "r: the side network is hidden / r wide (FFN: intermediate / r); must divide both", 2, 4096, {}},
        {"gate_T", ParamType::Float, 0.1, "the ladder gates' temperature T: μ = σ(α / T)", 1e-6, std::nullopt, {}},
        {"gate_alpha", ParamType::Float, 0.0, "every gate's α at the start (0: μ = ½)", std::nullopt, std::nullopt, {}},
        {"dropout", ParamType::Float, 0.1, "the side blocks' dropout (hidden states and attention probabilities), in training", 0.0, 0.99, {}},
        {"layer_norm_eps", ParamType::Float, 0.0,
         "the side blocks' norm epsilon; 0: the architecture's (BERT 1e-12, RoBERTa and GPT-2 1e-5, RMSNorm decoders 1e-6)", 0.0, 1.0, {}},
        {"init_std", ParamType::Float, 0.02, "the ladders' and the final up-projection's weights ~ N(0, init_std), biases 0", 0.0, 1.0, {}},
        {"rope_theta", ParamType::Float, 10000.0, "rotary decoders (LLaMA family): the side blocks' rotary base, at the side's head width", 1.0, std::nullopt, {}},
        {"relative_attention_max_distance", ParamType::Int, std::int64_t{128}, "T5: the distance where the side's position buckets stop growing (T5's 128)", 2,
         std::nullopt, {}},
        {"ff_activation", ParamType::String, std::string(""), "T5: the side FFN's activation; empty: relu, gelu_new where the backbone's FFN is gated (T5 v1.1)",
         std::nullopt, std::nullopt, {"", "relu", "gelu_new", "gelu", "silu"}},
    }};
  }

  void attach(tessera::AttachContext& ctx) override {
    const auto& info = ctx.model.info();
    arch_ = info.architecture;
    model_ = &ctx.model;
    Pruner pruner{ctx.model, 0, 0};
    t5_ = arch_ == "t5";
    decoder_ = arch_ != "bert" && arch_ != "roberta" && !t5_;
    if (decoder_ && (!pruner.maybe("layers.0.attn.norm.weight").defined() || !pruner.maybe("norm.weight").defined()))
      throw std::runtime_error("LST's side network is written for BERT-family encoders, pre-norm decoders (GPT-2, the LLaMA family) and T5, not a " + arch_ +
                               " model");
    read(ctx.params, info, pruner);
    opts_ = info.param_options;
    pruner.d = d_, pruner.inner = inner_, pruner.attn = heads_ * side_kv_;
    // The residual stream's first kept dimensions: the word embeddings' strongest columns.
    Tensor prev = top_rows(pruner.base("embed.word.weight").abs().sum(0), d_);
    at::NoGradGuard no_grad;
    if (!t5_) {
      stacks_.push_back(prune_stack("", "", layers_, pruner, prev, [&](std::int64_t i, Tensor& p) { return decoder_ ? pruner.decoder_block(i, p) : pruner.bert_block(i, p); }));
    } else {  // the decoder's chain continues from the encoder's last kept dimensions, as the authors' does
      for (const std::string which : {"encoder", "decoder"})
        stacks_.push_back(prune_stack(which, which + ".", stack_layers(which), pruner, prev,
                                      [&](std::int64_t i, Tensor& p) { return pruner.t5_block(which, i, p, which == "decoder"); }));
    }
    up_ = linear(H_, d_);
    for (auto& [k, t] : state()) t.set_requires_grad(true);
    if (t5_) install_t5(ctx);
    else install(ctx);
  }

  tessera::NamedTensors trainable() override { return state(); }

  // Tessera's layout, with the authors' names: side_first_downsample, side_downsamples.i,
  // side_gate_params.i, side_block.i.<block tensor> (BERT's names for BERT, our canonical
  // ones for decoders), side_final_layer_norm (decoders), side_final_upsample.
  // T5: each of those under encoder. and decoder. (final_side_layer_norm, and the stack's
  // side_relative_attention_bias), side_final_upsample once.
  tessera::NamedTensors state() override {
    tessera::NamedTensors out;
    for (const auto& st : stacks_) {
      const std::string& p = st.prefix;
      out[p + "side_first_downsample.weight"] = st.first.first;
      out[p + "side_first_downsample.bias"] = st.first.second;
      for (std::size_t i = 0; i < st.blocks.size(); ++i) {
        const std::string n = std::to_string(i);
        out[p + "side_downsamples." + n + ".weight"] = st.downs[i].first;
        out[p + "side_downsamples." + n + ".bias"] = st.downs[i].second;
        out[p + "side_gate_params." + n] = st.gates[i];
        for (auto& [k, t] : st.blocks[i]) out[p + "side_block." + n + "." + k] = t;
      }
      for (auto& [k, t] : st.final_norm) out[p + k] = t;
      if (st.bias.defined()) out[p + "side_relative_attention_bias.weight"] = st.bias;
    }
    out["side_final_upsample.weight"] = up_.first;
    out["side_final_upsample.bias"] = up_.second;
    return out;
  }

  void load_state(const tessera::NamedTensors& tensors) override {
    tessera::load_exact(state(), tensors, "this LST side network (" + std::to_string(layers_) + " layers, width " + std::to_string(d_) + ")",
                        "reduction factor " + std::to_string(r_));
  }

  std::string adapter_config_json() const override {
    nlohmann::json side{{"method", "lst"}, {"architecture", arch_}, {"reduction_factor", r_}, {"gate_T", gate_T_}, {"hidden_size", H_},
                        {"side_hidden_size", d_}, {"side_intermediate_size", inner_}, {"num_layers", layers_}, {"num_attention_heads", heads_},
                        {"dropout", dropout_}, {"layer_norm_eps", eps_}, {"init", "pruned by weight magnitude (L1)"},
                        {"block", t5_ ? "T5 encoder and decoder" : decoder_ ? "pre-norm causal decoder" : "post-norm BERT"}};
    if (t5_) {
      side["encoder_layers"] = stacks_[0].blocks.size(), side["decoder_layers"] = stacks_[1].blocks.size();
      side["side_d_kv"] = side_kv_, side["relative_attention_max_distance"] = max_distance_, side["ff_activation"] = t5_act_;
      side["mlp"] = gated_ ? "gated" : "dense";
    }
    if (decoder_) {
      side["norm"] = rms_ ? "rms_norm" : "layer_norm";
      side["mlp"] = gated_ ? "swiglu" : "gelu_tanh";
      side["num_key_value_heads"] = kv_heads_;
      if (rope_) side["rope_theta"] = rope_theta_;
    }
    return nlohmann::json{{"tessera", side}}.dump(2);
  }

 private:
  void read(const tessera::Params& p, const tessera::ModelInfo& info, const Pruner& pruner) {
    r_ = p.integer("reduction_factor");
    H_ = info.hidden_size, layers_ = info.num_layers, heads_ = info.num_heads;
    if (H_ % r_ != 0 || info.intermediate_size % r_ != 0)
      throw tessera::ParamError("reduction_factor", "reduction_factor " + std::to_string(r_) + " does not divide the hidden size " + std::to_string(H_) +
                                                        " and the intermediate size " + std::to_string(info.intermediate_size));
    d_ = H_ / r_, inner_ = info.intermediate_size / r_;
    if (t5_) {
      read_t5(p, pruner);
    } else if (d_ % heads_ != 0)
      throw tessera::ParamError("reduction_factor", "reduction_factor " + std::to_string(r_) + " leaves a side width of " + std::to_string(d_) +
                                                        ", which the model's " + std::to_string(heads_) + " heads do not divide");
    kv_heads_ = heads_;
    if (decoder_) {  // the block's kind, read from the backbone's tensors
      rms_ = !pruner.maybe("layers.0.attn.norm.bias").defined();
      gated_ = pruner.maybe("layers.0.mlp.gate.weight").defined();
      rope_ = !pruner.maybe("embed.position.weight").defined();
      const auto q = pruner.projection("layers.0.attn.q").first, k = pruner.projection("layers.0.attn.k").first;
      kv_heads_ = heads_ * k.size(0) / q.size(0);
    }
    gate_T_ = p.number("gate_T"), gate_alpha_ = p.number("gate_alpha"), dropout_ = p.number("dropout");
    const double arch_eps = t5_ ? 1e-6 : !decoder_ ? (arch_ == "roberta" ? 1e-5 : 1e-12) : rms_ ? 1e-6 : 1e-5;
    eps_ = p.number("layer_norm_eps") > 0 ? p.number("layer_norm_eps") : arch_eps;
    init_std_ = p.number("init_std"), rope_theta_ = p.number("rope_theta");
  }

  // T5's side sizes: every head keeps d_kv / r of its width (r must divide d_kv), so the
  // side attention is heads · d_kv / r wide, as the authors divide d_kv.
  void read_t5(const tessera::Params& p, const Pruner& pruner) {
    const std::int64_t d_kv = pruner.base("encoder.layers.0.attn.q.weight").size(0) / heads_;
    if (d_kv % r_ != 0)
      throw tessera::ParamError("reduction_factor", "reduction_factor " + std::to_string(r_) + " does not divide the attention heads' width d_kv = " + std::to_string(d_kv));
    side_kv_ = d_kv / r_;
    rms_ = true;
    gated_ = pruner.maybe("encoder.layers.0.mlp.gate.weight").defined();
    t5_act_ = p.text("ff_activation").empty() ? (gated_ ? "gelu_new" : "relu") : p.text("ff_activation");
    max_distance_ = p.integer("relative_attention_max_distance");
  }

  std::pair<Tensor, Tensor> linear(std::int64_t out, std::int64_t in) const {
    return {at::empty({out, in}, opts_).normal_(0.0, init_std_), at::zeros({out}, opts_)};
  }
  std::map<std::string, Tensor> placed(std::map<std::string, Tensor> b) const {
    for (auto& [k, t] : b) t = t.to(opts_.dtype()).to(opts_.device()).contiguous();
    return b;
  }
  std::int64_t stack_layers(const std::string& which) const {
    std::int64_t n = 0;
    for (const auto* l : model_->layer_sites()) n += l->name().rfind(which + ".", 0) == 0;
    return n;
  }

  // One side stack: its ladders and gates, its blocks pruned from the backbone's (`block`
  // carries the stream's kept dimensions `prev` through them), and where the blocks are
  // pre-norm the backbone's final norm pruned to the last ones; T5's also the backbone's
  // relative position bias table of stack `which`, whole (the heads are the same).
  Stack prune_stack(const std::string& which, std::string prefix, std::int64_t layers, const Pruner& pruner, Tensor& prev,
                    const std::function<std::map<std::string, Tensor>(std::int64_t, Tensor&)>& block) const {
    Stack st;
    st.prefix = std::move(prefix);
    st.first = linear(d_, H_);
    for (std::int64_t i = 0; i < layers; ++i) {
      st.downs.push_back(linear(d_, H_));
      st.gates.push_back(at::full({1}, gate_alpha_, opts_));
      st.blocks.push_back(placed(block(i, prev)));
    }
    std::map<std::string, Tensor> n;
    if (t5_) {
      pruner.norm(which + ".norm", "final_side_layer_norm", prev, n);
      st.bias = placed({{"bias", pruner.base(which + ".position_bias.weight")}}).at("bias");
    } else if (decoder_) {
      pruner.norm("norm", "side_final_layer_norm", prev, n);
    }
    st.final_norm = placed(std::move(n));
    return st;
  }

  void install(tessera::AttachContext& ctx) {
    auto* out = ctx.model.output_site();
    auto* embed = ctx.model.embedding_site();
    const auto layer_sites = ctx.model.layer_sites();
    if (out == nullptr || embed == nullptr || static_cast<std::int64_t>(layer_sites.size()) != layers_)
      throw std::runtime_error("LST needs the model's embedding, layer and output sites");
    auto seen = std::make_shared<std::vector<Tensor>>(layers_ + 1);  // x_0, h_0 … h_{L-1}: detached, (B, T, H)
    embed->add_tap(ctx.owner, [seen](const Tensor& x) {  // a forward starts: no state of an earlier one survives
      for (auto& t : *seen) t = Tensor();
      (*seen)[0] = x;
    });
    for (std::int64_t i = 0; i < layers_; ++i) layer_sites[i]->add_tap(ctx.owner, [seen, i](const Tensor& h) { (*seen)[i + 1] = h; });
    // The side network reads every earlier position: with a KV cache the host would show it
    // the new tokens only, so the host's generate recomputes the sequence while an output
    // transform is installed.
    out->add_transform(ctx.owner, [this, seen](const Tensor& h) {
      Tensor y = side(*seen, h.scalar_type());
      for (auto& t : *seen) t = Tensor();  // the backbone's states go with this forward
      return y;
    });
  }

  // T5: the encoder's states (its embedding tap x_0, each layer's output, its padding mask)
  // stay for every decoding call of that source, the side encoder's output computed once
  // per source when no gradient is asked for (generation); the decoder's states (its first
  // layer's input and each layer's output) go with each call, as the side decoder reads them.
  void install_t5(tessera::AttachContext& ctx) {
    auto* out = ctx.model.output_site();
    auto* embed = ctx.model.embedding_site();
    std::vector<tessera::LayerSite*> enc_layers, dec_layers;
    for (auto* l : ctx.model.layer_sites()) (l->name().rfind("encoder.", 0) == 0 ? enc_layers : dec_layers).push_back(l);
    if (out == nullptr || embed == nullptr || enc_layers.size() != stacks_[0].blocks.size() || dec_layers.size() != stacks_[1].blocks.size())
      throw std::runtime_error("LST needs T5's embedding, layer and output sites");
    auto t = std::make_shared<T5States>();
    t->enc.resize(enc_layers.size() + 1), t->dec.resize(dec_layers.size() + 1);
    embed->add_tap(ctx.owner, [t](const Tensor& x) {  // a new source: nothing of the last one survives
      *t = T5States{std::vector<Tensor>(t->enc.size()), std::vector<Tensor>(t->dec.size()), {}, {}};
      t->enc[0] = x;
    });
    for (std::size_t i = 0; i < enc_layers.size(); ++i)
      enc_layers[i]->add_tap(ctx.owner, [this, t, i](const Tensor& h) {
        if (i == 0) t->source_mask = model_->attention_mask().to(at::kBool);  // (B, S): the encoder's forward context
        t->enc[i + 1] = h;
      });
    dec_layers[0]->add_input_tap(ctx.owner, [t](const Tensor& y) { t->dec[0] = y; });  // the decoder's embeddings, after dropout
    for (std::size_t i = 0; i < dec_layers.size(); ++i) dec_layers[i]->add_tap(ctx.owner, [t, i](const Tensor& h) { t->dec[i + 1] = h; });
    out->add_transform(ctx.owner, [this, t](const Tensor& h) {
      const auto dtype = h.scalar_type();
      const Tensor enc = t->side_encoder.defined() ? t->side_encoder : side_encoder(*t, dtype);
      if (!at::GradMode::is_enabled()) t->side_encoder = enc;
      Tensor y = side_decoder(*t, enc, dtype);
      for (auto& s : t->dec) s = Tensor();
      return y;
    });
  }

  // What the T5 side network reads of one source and its current decoding call.
  struct T5States {
    std::vector<Tensor> enc, dec;  // x_0, h_0 … h_{L-1} of each stack: detached, (B, S or U, H)
    Tensor source_mask;            // (B, S) bool
    Tensor side_encoder;           // (B, S, d): kept for the source's later calls in generation
  };

  Tensor side_encoder(const T5States& t, c10::ScalarType dtype) const {
    if (!t.source_mask.defined()) throw std::runtime_error("LST's side decoder ran before the encoder's layers");
    const auto S = t.source_mask.size(1);
    const Tensor keys = t.source_mask.unsqueeze(1).unsqueeze(1);  // (B, 1, 1, S)
    const Tensor bias = t5_bias(stacks_[0].bias, S, true, dtype);
    const Tensor s = ladder(stacks_[0], t.enc, dtype, [&](std::size_t i, const Tensor& x) { return t5_block(stacks_[0].blocks[i], x, keys, bias, nullptr, {}, dtype); });
    return tessera::dropout(norm(stacks_[0].final_norm, "final_side_layer_norm", s, dtype), dropout_, model_->training());
  }

  Tensor side_decoder(const T5States& t, const Tensor& enc, c10::ScalarType dtype) const {
    const auto U = t.dec[0].size(1);
    const Tensor causal = at::ones({U, U}, t.source_mask.options().dtype(at::kBool)).tril().view({1, 1, U, U});
    const Tensor keys = t.source_mask.unsqueeze(1).unsqueeze(1);
    const Tensor bias = t5_bias(stacks_[1].bias, U, false, dtype);
    const Tensor s = ladder(stacks_[1], t.dec, dtype, [&](std::size_t i, const Tensor& x) { return t5_block(stacks_[1].blocks[i], x, causal, bias, &enc, keys, dtype); });
    const Tensor out = tessera::dropout(norm(stacks_[1].final_norm, "final_side_layer_norm", s, dtype), dropout_, model_->training());
    return at::linear(out, up_.first.to(dtype), up_.second.to(dtype));  // (B, U, H): T5's head rescales and reads it
  }

  // T5's relative position bias over n positions from the side's table: (1, heads, n, n).
  // Half the buckets are exact distances, the rest grow logarithmically up to max_distance;
  // bidirectional (the encoder) splits them by the sign of key − query.
  Tensor t5_bias(const Tensor& table, std::int64_t n, bool bidirectional, c10::ScalarType dtype) const {
    const auto opts = table.options().dtype(at::kLong);
    Tensor rel = at::arange(n, opts).view({1, n}) - at::arange(n, opts).view({n, 1});  // key − query
    std::int64_t buckets = table.size(0);
    Tensor bucket = at::zeros_like(rel);
    if (bidirectional) {
      buckets /= 2;
      bucket = bucket + rel.gt(0).to(at::kLong) * buckets;
      rel = rel.abs();
    } else {
      rel = (-rel).clamp_min(0);
    }
    const std::int64_t exact = buckets / 2;
    Tensor large = exact + (at::log(rel.to(at::kFloat) / static_cast<double>(exact)) / std::log(static_cast<double>(max_distance_) / static_cast<double>(exact)) *
                            static_cast<double>(buckets - exact)).to(at::kLong);
    large = at::minimum(large, at::full_like(large, buckets - 1));
    bucket = bucket + at::where(rel.lt(exact), rel, large);
    return at::embedding(table.to(dtype), bucket).permute({2, 0, 1}).unsqueeze(0);
  }

  // A T5 block at the side's width: pre-norm RMS, self-attention with the stack's position
  // bias, the decoder's cross-attention to the side encoder (no bias), the FFN; each branch's
  // output dropped out before its residual add, as T5's.
  Tensor t5_block(const std::map<std::string, Tensor>& b, const Tensor& s, const Tensor& allowed, const Tensor& bias, const Tensor* source,
                  const Tensor& source_keys, c10::ScalarType dtype) const {
    const bool train = model_->training();
    auto w = [&](const std::string& name) { return b.at(name + ".weight").to(dtype); };
    const Tensor n1 = norm(b, "attn.norm", s, dtype);
    Tensor h = s + tessera::dropout(t5_attention(b, "attn", n1, n1, allowed, bias, dtype), dropout_, train);
    if (source != nullptr) {
      const Tensor n2 = norm(b, "cross.norm", h, dtype);
      h = h + tessera::dropout(t5_attention(b, "cross", n2, *source, source_keys, Tensor(), dtype), dropout_, train);
    }
    const Tensor n3 = norm(b, "mlp.norm", h, dtype);
    Tensor inner = activate(at::linear(n3, w(gated_ ? "mlp.gate" : "mlp.up")));
    if (gated_) inner = inner * at::linear(n3, w("mlp.up"));
    return h + tessera::dropout(at::linear(tessera::dropout(inner, dropout_, train), w("mlp.down")), dropout_, train);
  }

  Tensor activate(const Tensor& x) const {
    if (t5_act_ == "relu") return at::relu(x);
    if (t5_act_ == "gelu_new") return at::gelu(x, "tanh");
    if (t5_act_ == "gelu") return at::gelu(x);
    return at::silu(x);
  }

  // T5's attention: softmax(q kᵀ + bias) v, unscaled, the softmax in f32; heads of width d_kv / r.
  Tensor t5_attention(const std::map<std::string, Tensor>& b, const std::string& kind, const Tensor& x, const Tensor& source, const Tensor& allowed,
                      const Tensor& bias, c10::ScalarType dtype) const {
    auto w = [&](const char* name) { return b.at(kind + "." + name + ".weight").to(dtype); };
    auto heads = [&](const Tensor& y) { return y.view({y.size(0), y.size(1), heads_, side_kv_}).transpose(1, 2); };  // (B, heads, T, d_kv / r)
    const Tensor q = heads(at::linear(x, w("q"))), k = heads(at::linear(source, w("k"))), v = heads(at::linear(source, w("v")));
    Tensor scores = at::matmul(q, k.transpose(-1, -2));  // (B, heads, T, S)
    if (bias.defined()) scores = scores + bias;
    scores = scores.masked_fill(allowed.logical_not(), -std::numeric_limits<float>::infinity());
    const Tensor probs = tessera::dropout(at::softmax(scores.to(at::kFloat), -1).to(dtype), dropout_, model_->training());
    const Tensor ctx = at::matmul(probs, v).transpose(1, 2).reshape({x.size(0), x.size(1), heads_ * side_kv_});
    return at::linear(ctx, w("o"));
  }

  // The side network over the tapped states; (B, T, H) in the compute dtype.
  Tensor side(const std::vector<Tensor>& seen, c10::ScalarType dtype) const {
    auto lin = [dtype](const Tensor& x, const std::pair<Tensor, Tensor>& w) { return at::linear(x, w.first.to(dtype), w.second.to(dtype)); };
    const Tensor real = model_->attention_mask().to(at::kBool);  // (B, T): real tokens
    const Context c = decoder_ ? decoder_context(real, dtype) : Context{real.unsqueeze(1).unsqueeze(1), {}, {}};
    const Stack& st = stacks_[0];
    Tensor s = ladder(st, seen, dtype, [&](std::size_t i, const Tensor& x) {
      return decoder_ ? decoder_block(st.blocks[i], x, c, dtype) : bert_block(st.blocks[i], x, c.allowed, dtype);
    });  // (B, T, d)
    if (decoder_) s = norm(st.final_norm, "side_final_layer_norm", s, dtype);
    return lin(s, up_);
  }

  // The side stack over the tapped states seen = (x_0, h_0 … h_{L-1}): the first ladder, then
  // per layer the gated ladder and `block` i. (B, T, d) in the compute dtype.
  Tensor ladder(const Stack& st, const std::vector<Tensor>& seen, c10::ScalarType dtype, const std::function<Tensor(std::size_t, const Tensor&)>& block) const {
    for (const auto& t : seen)
      if (!t.defined()) throw std::runtime_error("LST's side network ran without every layer's states (a layer was skipped)");
    auto lin = [dtype](const Tensor& x, const std::pair<Tensor, Tensor>& w) { return at::linear(x, w.first.to(dtype), w.second.to(dtype)); };
    Tensor s = lin(seen[0], st.first);
    for (std::size_t i = 0; i < st.blocks.size(); ++i) {
      const Tensor mu = at::sigmoid(st.gates[i] / gate_T_).to(dtype);
      s = mu * s + (1 - mu) * lin(seen[i + 1], st.downs[i]);
      s = block(i, s);
    }
    return s;
  }

  // What every side block of one forward shares.
  struct Context {
    Tensor allowed;   // (B, 1, 1, T) BERT: real keys; (B, 1, T, T) decoders: causal ∧ real, and each query itself
    Tensor cos, sin;  // (B, 1, T, head width): the side's rotary tables (rotary decoders)
  };

  Context decoder_context(const Tensor& real, c10::ScalarType dtype) const {
    const auto T = real.size(1);
    const auto bools = real.options().dtype(at::kBool);
    // A left-padded query (generation) has no real key before it: it sees itself, so no
    // row is all -inf (whose NaN would reach real tokens through 0 · NaN).
    const Tensor allowed = (at::ones({T, T}, bools).tril() & real.unsqueeze(1).unsqueeze(1)) | at::eye(T, bools);
    if (!rope_) return {allowed, {}, {}};
    const auto hd = d_ / heads_;
    const Tensor positions = (at::cumsum(real.to(at::kLong), 1) - 1).clamp_min(0);  // (B, T), as the host numbers tokens
    const auto f64 = real.options().dtype(at::kDouble);
    const Tensor inv = at::pow(rope_theta_, at::arange(0, hd, 2, f64) / static_cast<double>(hd)).reciprocal();  // (hd/2)
    const Tensor freqs = positions.to(at::kDouble).unsqueeze(-1) * inv;                                            // (B, T, hd/2)
    const Tensor angles = at::cat({freqs, freqs}, -1).unsqueeze(1);                                                // (B, 1, T, hd)
    return {allowed, angles.cos().to(dtype), angles.sin().to(dtype)};
  }

  Tensor norm(const std::map<std::string, Tensor>& b, const std::string& name, const Tensor& x, c10::ScalarType dtype) const {
    const Tensor w = b.at(name + ".weight").to(dtype);
    if (rms_) return x * at::rsqrt(x.pow(2).mean(-1, true) + eps_) * w;
    return at::layer_norm(x, {d_}, w, b.at(name + ".bias").to(dtype), eps_);
  }

  // A BERT layer of width d: self-attention, then the FFN, each followed by residual + LayerNorm.
  Tensor bert_block(const std::map<std::string, Tensor>& b, const Tensor& s, const Tensor& mask, c10::ScalarType dtype) const {
    const bool train = model_->training();
    auto w = [&](const char* name) { return b.at(name).to(dtype); };
    auto heads = [&](const Tensor& x) { return x.view({x.size(0), x.size(1), heads_, d_ / heads_}).transpose(1, 2); };  // (B, heads, T, d/heads)
    const Tensor q = heads(at::linear(s, w("attention.self.query.weight"), w("attention.self.query.bias")));
    const Tensor k = heads(at::linear(s, w("attention.self.key.weight"), w("attention.self.key.bias")));
    const Tensor v = heads(at::linear(s, w("attention.self.value.weight"), w("attention.self.value.bias")));
    const Tensor ctx = attend(q, k, v, mask, train);  // (B, T, d)
    const std::vector<std::int64_t> shape{d_};
    const Tensor a = tessera::dropout(at::linear(ctx, w("attention.output.dense.weight"), w("attention.output.dense.bias")), dropout_, train);
    const Tensor s1 = at::layer_norm(s + a, shape, w("attention.output.LayerNorm.weight"), w("attention.output.LayerNorm.bias"), eps_);
    const Tensor m = tessera::dropout(
        at::linear(at::gelu(at::linear(s1, w("intermediate.dense.weight"), w("intermediate.dense.bias"))), w("output.dense.weight"), w("output.dense.bias")), dropout_,
        train);
    return at::layer_norm(s1 + m, shape, w("output.LayerNorm.weight"), w("output.LayerNorm.bias"), eps_);
  }

  // A pre-norm causal block of width d: s + Attn(Norm s), then + MLP(Norm ·); rotary and
  // grouped-query attention as the backbone has them; GELU(tanh) or SwiGLU MLP.
  Tensor decoder_block(const std::map<std::string, Tensor>& b, const Tensor& s, const Context& c, c10::ScalarType dtype) const {
    const bool train = model_->training();
    auto lin = [&](const std::string& name, const Tensor& x) {
      const auto bias = b.find(name + ".bias");
      return at::linear(x, b.at(name + ".weight").to(dtype), bias == b.end() ? Tensor() : bias->second.to(dtype));
    };
    const auto hd = d_ / heads_;
    auto heads = [&](const Tensor& x) { return x.view({x.size(0), x.size(1), -1, hd}).transpose(1, 2); };  // (B, heads, T, hd)
    auto rotate = [&](const Tensor& x) {
      if (!rope_) return x;
      const Tensor half = at::cat({-x.narrow(-1, hd / 2, hd / 2), x.narrow(-1, 0, hd / 2)}, -1);
      return x * c.cos + half * c.sin;
    };
    const Tensor n1 = norm(b, "attn.norm", s, dtype);
    const Tensor q = rotate(heads(lin("attn.q", n1)));
    const auto group = heads_ / kv_heads_;
    const Tensor k = rotate(heads(lin("attn.k", n1))).repeat_interleave(group, 1), v = heads(lin("attn.v", n1)).repeat_interleave(group, 1);
    const Tensor h1 = s + tessera::dropout(lin("attn.o", attend(q, k, v, c.allowed, train)), dropout_, train);
    const Tensor n2 = norm(b, "mlp.norm", h1, dtype);
    const Tensor inner = gated_ ? at::silu(lin("mlp.gate", n2)) * lin("mlp.up", n2) : at::gelu(lin("mlp.up", n2), "tanh");
    return h1 + tessera::dropout(lin("mlp.down", inner), dropout_, train);
  }

  // softmax(q kᵀ / √hd) v over the allowed keys, heads merged: (B, T, d).
  Tensor attend(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& allowed, bool train) const {
    Tensor scores = at::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(d_ / heads_));  // (B, heads, T, T)
    scores = scores.masked_fill(allowed.logical_not(), -std::numeric_limits<float>::infinity());
    const Tensor probs = tessera::dropout(at::softmax(scores, -1), dropout_, train);
    return at::matmul(probs, v).transpose(1, 2).reshape({q.size(0), q.size(2), d_});
  }

  tessera::ModelView* model_ = nullptr;
  std::string arch_;
  bool decoder_ = false, t5_ = false, rms_ = false, gated_ = false, rope_ = false;
  std::int64_t r_ = 8, H_ = 0, layers_ = 0, heads_ = 0, kv_heads_ = 0, d_ = 0, inner_ = 0, side_kv_ = 0, max_distance_ = 128;
  double gate_T_ = 0.1, gate_alpha_ = 0.0, dropout_ = 0.1, eps_ = 1e-12, init_std_ = 0.02, rope_theta_ = 10000.0;
  std::string t5_act_;
  c10::TensorOptions opts_;
  std::vector<Stack> stacks_;            // one; T5: the encoder's, the decoder's
  std::pair<Tensor, Tensor> up_;         // (H, d), (H)
};

}  // namespace

TESSERA_PLUGIN(Lst, "lst", "1.0.0", "additive",
               "Ladder side-tuning: a narrow side network, initialised from the pruned backbone, fed by gated ladders; no backward through the backbone",
               "Sung, Cho, Bansal 2022, LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning, arXiv:2206.06522")
