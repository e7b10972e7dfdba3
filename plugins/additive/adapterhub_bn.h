// What AdapterHub's bottleneck adapters share in Tessera's plugins, whatever their two
// projections are: dense (`bottleneck`) or sums of Kronecker products (`compacter`). AdapterHub
// models both as one BnConfig with `phm_layer` on or off; here one base class places and
// wires the adapter (presets, sublayer sites, residual and norm, scale, dropout), names its
// tensors and writes its adapter_config.json, and a plugin supplies the projections.
// Header-only, SDK-only, like the plugins.
//
//   A(z) = s · (up(act(down(z))))            down: H -> r, up: r -> H (biases inside)
//   gated (use_gating): A(z) · mean_t σ(z W_g + b_g), one gate per sample from the adapter's
//                       own input, its mean over the sample's real tokens (tessera/sample_mean.h)
//   sequential:  z = N(h + x) (Pfeiffer) or h (Houlsby);  h' = A(z) + (h, or z)
//   parallel:    h' = h + A(x)
//
// h: the sublayer's output before its residual add; x: the residual stream it is added to;
// N: the block's own norm after that add (identity in pre-norm blocks). The block then
// computes N(x + h') as always (SDK 2.3's residual module).
//
// Invertible adapter (inv_adapter, MAD-X: Pfeiffer et al. 2020, arXiv:2005.00052): a coupling
// block on the first layer's input (SDK 2.7's embedding transform), its inverse before the
// language-model head. x = [x1 ; x2] split at H/2 on the hidden axis:
//   nice:  y1 = x1 + F(x2),  y2 = x2 + G(y1)              inverse: x2 = y2 − G(y1), x1 = y1 − F(x2)
//   glow:  [a2 ; t2] = s2(x2), y1 = e(a2) x1 + t2,  [a1 ; t1] = s1(y1), y2 = e(a1) x2 + t1
//          e(a) = exp(5 · 0.636 · atan(a / 5))            inverse: the same steps undone, last first
// F, G, s1, s2: Linear → act → Linear, inner width ⌊half / inv_adapter_reduction_factor⌋.
#pragma once

#include <tessera/dropout.h>
#include <tessera/extensions.h>
#include <tessera/method.h>
#include <tessera/sample_mean.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/StringUtil.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <regex>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace tessera::adapterhub_bn {

// AdapterHub's presets (adapters.configuration.adapter_config): where the adapters go and
// the defaults of the keys a user may override.
struct Preset {
  bool parallel, ln_before;
  double reduction, scaling;
  const char *act, *init, *scaling_type;
  std::vector<std::string> targets;  // sublayer sites: "attn" (mh_adapter), "mlp" (output_adapter)
  const char* inv = "";              // the invertible adapter: "", "nice" or "glow"
};

// AdapterHub's dense presets (BnConfig's seq_bn, double_seq_bn, par_bn, scaled_par_bn).
inline const std::map<std::string, Preset>& bottleneck_presets() {
  static const std::map<std::string, Preset> p = {
      {"seq_bn", {false, true, 16, 1.0, "relu", "bert", "fixed", {"mlp"}}},                  // Pfeiffer
      {"double_seq_bn", {false, false, 16, 1.0, "swish", "bert", "fixed", {"attn", "mlp"}}},  // Houlsby
      {"par_bn", {true, false, 2, 4.0, "relu", "mam_adapter", "fixed", {"mlp"}}},             // He et al.
      {"scaled_par_bn", {true, false, 2, 4.0, "relu", "mam_adapter", "learned", {"mlp"}}},
      {"seq_bn_inv", {false, true, 16, 1.0, "relu", "bert", "fixed", {"mlp"}, "nice"}},  // MAD-X's language adapter
      {"double_seq_bn_inv", {false, false, 16, 1.0, "swish", "bert", "fixed", {"attn", "mlp"}, "nice"}},
  };
  return p;
}

// The keys choosing a dense preset and its initialisation.
inline std::vector<ParamSpec> bottleneck_preset_keys() {
  return {
      {"config", ParamType::String, std::string("seq_bn"),
       "AdapterHub's preset: seq_bn (Pfeiffer), double_seq_bn (Houlsby), par_bn (He et al.'s parallel adapter), scaled_par_bn (with a learned scale), "
       "seq_bn_inv and double_seq_bn_inv (with a NICE invertible adapter on the embeddings: MAD-X)",
       std::nullopt, std::nullopt, {"seq_bn", "double_seq_bn", "par_bn", "scaled_par_bn", "seq_bn_inv", "double_seq_bn_inv"}},
      {"init_weights", ParamType::String, std::string(""),
       "bert: N(0, 0.02) weights; mam_adapter: Kaiming-uniform down, zero up (starts at the base model); houlsby: truncated N(0, 0.01); empty: the preset's",
       std::nullopt, std::nullopt, {"", "bert", "mam_adapter", "houlsby"}},
  };
}

// A dense projection as nn.Linear holds it, weight (out, in) and bias (out), started by one of
// AdapterHub's three initialisations (Adapter.__init__); biases start at 0. Not yet requiring grad.
inline NamedTensors dense_projection(std::int64_t in, std::int64_t out, const std::string& position, const std::string& init, const c10::TensorOptions& opts) {
  at::Tensor w = at::empty({out, in}, opts), b = at::zeros({out}, opts);
  at::NoGradGuard no_grad;
  if (init == "bert") {
    w.normal_(0.0, 0.02);
  } else if (init == "mam_adapter") {  // down: kaiming_uniform_(a=√5), U(±1/√fan_in) as nn.Linear's default; up: 0
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    if (position == "down") w.uniform_(-bound, bound);
    else w.zero_();
  } else {  // houlsby: N(0, 0.01) truncated at ±2σ
    w.normal_(0.0, 0.01);
    while (true) {
      const at::Tensor outside = w.abs() > 0.02;
      if (!outside.any().item<bool>()) break;
      w.masked_scatter_(outside, at::randn({outside.sum().item<std::int64_t>()}, w.options()) * 0.01);
    }
  }
  return {{"weight", w}, {"bias", b}};
}

// transformers' ACT2FN, which AdapterHub's adapters use.
inline at::Tensor activate(const std::string& name, const at::Tensor& x) {
  if (name == "relu") return at::relu(x);
  if (name == "swish" || name == "silu") return at::silu(x);
  if (name == "gelu") return at::gelu(x);
  if (name == "gelu_new" || name == "gelu_pytorch_tanh") return at::gelu(x, "tanh");
  if (name == "tanh") return at::tanh(x);
  if (name == "leakyrelu") return at::leaky_relu(x, 0.01);
  return at::sigmoid(x);  // "sigmoid": the schema admits nothing else
}

// Python's float floor division a // b, which AdapterHub sizes its bottleneck with: it
// rounds (a − fmod(a, b)) / b, not a / b (384 // 12.8 is 29, floor(384 / 12.8) is 30).
inline std::int64_t python_floor_div(double a, double b) {
  const double mod = std::fmod(a, b);
  double div = (a - mod) / b;
  const double floor_div = std::floor(div);
  if (div - floor_div > 0.5) div = floor_div + 1.0;  // CPython's correction of the quotient
  else div = floor_div;
  return static_cast<std::int64_t>(div);
}

// A reduction factor AdapterHub maps back to r (int(H // rf) == r): H / r when r divides H,
// else H / (r + ½), which no rounding moves off r.
inline double adapterhub_reduction(std::int64_t H, std::int64_t r) {
  return H % r == 0 ? static_cast<double>(H / r) : static_cast<double>(H) / (static_cast<double>(r) + 0.5);
}

// A sublayer site's kind, the last part of its name: attn, mlp, or T5's cross.
inline std::string site_kind(const std::string& site) { return site.substr(site.rfind('.') + 1); }

// The module that holds AdapterHub's adapter for a sublayer site, from the site's HF path:
// BERT keeps them in attention.output / output, decoders in the block's
// attention_adapters / output_adapters, T5 in the block's layer.i.
inline std::string adapterhub_module(const std::string& arch, const SublayerSite& s) {
  const std::string& hf = s.hf_path();
  const bool attn = site_kind(s.name()) == "attn";
  const std::string parent = hf.substr(0, hf.rfind('.'));
  if (arch == "bert" || arch == "roberta") return attn ? hf + ".output" : hf;
  if (arch == "t5") return parent;
  return parent + (attn ? ".attention_adapters" : ".output_adapters");
}

// The base model's prefix in a module path of a model with a head ("transformer." in GPT-2's,
// "model." in LLaMA's); empty for BERT and T5, whose paths start at the base model.
inline std::string base_prefix(const std::string& module) {
  for (const char* prefix : {"transformer.", "model."})
    if (module.rfind(prefix, 0) == 0) return prefix;
  return "";
}

// A file key with the model's base prefix and the adapter's name taken out, so that an
// adapter saved from another model class (BertModel or BertAdapterModel) or under another
// name matches: "bert.encoder.layer.0.output.adapters.x.adapter_up.weight" ->
// "encoder.layer.0.output.adapters.*.adapter_up.weight"; the tensors shared by all layers
// likewise: "transformer.shared_parameters.x.phm_rule" -> "shared_parameters.*.phm_rule".
inline std::string normalized(const std::string& key) {
  static const std::regex name(R"(\.adapters\.[^.]+\.)"), shared(R"((^|\.)shared_parameters\.[^.]+\.)"),
      inv(R"((^|\.)invertible_(lang_)?adapters\.[^.]+\.)");  // invertible_lang_adapters: AdapterHub's older name
  std::string k = std::regex_replace(key, name, ".adapters.*.", std::regex_constants::format_first_only);
  k = std::regex_replace(k, shared, "$1shared_parameters.*.", std::regex_constants::format_first_only);
  k = std::regex_replace(k, inv, "$1invertible_adapters.*.", std::regex_constants::format_first_only);
  for (const char* prefix : {"bert.", "roberta.", "transformer.", "model."})
    if (k.rfind(prefix, 0) == 0) return k.substr(std::string(prefix).size());
  return k;
}

// An invertible adapter's sub-network as AdapterHub builds it (get_subnet_constructor):
// Linear(in, inner) → act → Linear(inner, out), "<net>.0.*" and "<net>.2.*", weights N(0, 0.02²)
// and zero biases (Adapter.init_bert_weights, whatever the adapter's own init).
inline NamedTensors coupling_net(const std::string& net, std::int64_t in, std::int64_t inner, std::int64_t out, const c10::TensorOptions& opts) {
  at::NoGradGuard no_grad;
  return {{net + ".0.weight", at::empty({inner, in}, opts).normal_(0.0, 0.02).set_requires_grad(true)},
          {net + ".0.bias", at::zeros({inner}, opts).set_requires_grad(true)},
          {net + ".2.weight", at::empty({out, inner}, opts).normal_(0.0, 0.02).set_requires_grad(true)},
          {net + ".2.bias", at::zeros({out}, opts).set_requires_grad(true)}};
}

inline at::Tensor run_net(const NamedTensors& t, const std::string& net, const std::string& act, const at::Tensor& x) {
  const auto dt = x.scalar_type();
  auto w = [&](const char* n) { return t.at(net + n).to(dt); };
  return at::linear(activate(act, at::linear(x, w(".0.weight"), w(".0.bias"))), w(".2.weight"), w(".2.bias"));
}

// GLOW's soft clamp of a log-scale to ±5 · 0.636 · π/2 (FrEIA's e(s), clamp 5).
inline at::Tensor glow_scale(const at::Tensor& a) { return at::exp(5.0 * 0.636 * at::atan(a / 5.0)); }

// The coupling block (the formulas at the top), x (..., H) -> (..., H); `reverse` undoes it.
inline at::Tensor couple(const std::string& kind, const NamedTensors& t, const std::string& act, const at::Tensor& x, bool reverse) {
  const auto H = x.size(-1), h1 = H / 2, h2 = H - h1;
  const at::Tensor x1 = x.narrow(-1, 0, h1), x2 = x.narrow(-1, h1, h2);
  at::Tensor y1, y2;
  if (kind == "nice" && !reverse) {
    y1 = x1 + run_net(t, "F", act, x2);
    y2 = x2 + run_net(t, "G", act, y1);
  } else if (kind == "nice") {
    y2 = x2 - run_net(t, "G", act, x1);
    y1 = x1 - run_net(t, "F", act, y2);
  } else if (!reverse) {
    const at::Tensor r2 = run_net(t, "s2", act, x2);  // (..., 2 h1): log-scale, shift
    y1 = glow_scale(r2.narrow(-1, 0, h1)) * x1 + r2.narrow(-1, h1, h1);
    const at::Tensor r1 = run_net(t, "s1", act, y1);  // (..., 2 h2)
    y2 = glow_scale(r1.narrow(-1, 0, h2)) * x2 + r1.narrow(-1, h2, h2);
  } else {
    const at::Tensor r1 = run_net(t, "s1", act, x1);
    y2 = (x2 - r1.narrow(-1, h2, h2)) / glow_scale(r1.narrow(-1, 0, h2));
    const at::Tensor r2 = run_net(t, "s2", act, y2);
    y1 = (x1 - r2.narrow(-1, h1, h1)) / glow_scale(r2.narrow(-1, 0, h1));
  }
  return at::cat({y1, y2}, -1);
}

// One adapter at one sublayer site: its projections' tensors under AdapterHub's names inside
// adapter_down.0 / adapter_up ("weight", "bias"; or "W_left", "W_right", "b").
struct Adapter {
  SublayerSite* site;
  std::string module;   // AdapterHub's module path of the adapter ("encoder.layer.0.output")
  NamedTensors down;    // H -> r
  NamedTensors up;      // r -> H
  at::Tensor scale;     // learned: (1) or (H); undefined when fixed
  NamedTensors gate;    // use_gating: "weight" (1, H), "bias" (1); empty without
};

// A projection as the adapter runs it: x (..., in) -> (..., out), in the compute dtype.
using Projection = std::function<at::Tensor(const at::Tensor&)>;

class Wiring : public Method {
 public:
  void validate(const Params& p) const override {
    if (*presets().at(p.text("config")).inv != '\0' && !offers_invertible())
      throw ParamError("config", "the preset " + p.text("config") + " carries an invertible adapter, which this plugin does not offer");
    if (p.number("reduction_factor") > 0 && p.integer("bottleneck_size") > 0)
      throw ParamError("bottleneck_size", "give reduction_factor or bottleneck_size, not both");
    if (p.number("scaling") > 0) {
      const std::string type = p.text("scaling_type").empty() ? presets().at(p.text("config")).scaling_type : p.text("scaling_type");
      if (type != "fixed") throw ParamError("scaling", "a " + type + " scale starts at 1 and is trained: scaling applies to scaling_type = \"fixed\"");
    }
    validate_projections(p);
  }

  void attach(AttachContext& ctx) override {
    owner_ = &ctx.owner;
    model_ = &ctx.model;
    name_ = ctx.instance;
    arch_ = ctx.model.info().architecture;
    read(ctx.params, ctx.model.info().hidden_size);
    for (const auto* l : ctx.model.layer_sites()) encoder_layers_ += l->name().rfind("encoder.", 0) == 0;
    std::vector<std::string> targets = ctx.targets;
    if (targets.empty()) {
      targets = preset_->targets;
      if (cross_) targets.push_back("cross");
    }
    const auto& opts = ctx.model.info().param_options;
    for (auto* site : ctx.model.match_sublayers(targets)) {
      const auto H = site->hidden_size();
      Adapter a{site, adapterhub_module(arch_, *site), make(H, r_, "down"), make(r_, H, "up"), {}};
      if (scaling_type_ != "fixed") a.scale = at::ones({scaling_type_ == "channel" ? H : 1}, opts).set_requires_grad(true);
      if (gating_) a.gate = make_gate(H, opts);
      adapters_.push_back(std::move(a));
    }
    if (adapters_.empty()) throw std::runtime_error("no sublayer site of this " + arch_ + " model matches the targets");
    shared_prefix_ = base_prefix(adapters_.front().module) + "shared_parameters." + name_ + ".";
    for (const auto& a : adapters_) install(a);
    if (!inv_.empty()) install_invertible(ctx.model.info().hidden_size);
  }

  // What trains: every tensor of the state that requires a gradient (a fixed PHM rule does not).
  NamedTensors trainable() override {
    NamedTensors out;
    for (const auto& [k, t] : state())
      if (t.requires_grad()) out[k] = t;
    return out;
  }

  // AdapterHub's keys: <module>.adapters.<name>.{adapter_down.0,adapter_up}.<tensor>[, .scaling],
  // and [<base>.]shared_parameters.<name>.<tensor> for what all adapters share.
  NamedTensors state() override {
    NamedTensors out;
    for (const auto& a : adapters_) {
      const std::string k = a.module + ".adapters." + name_ + ".";
      for (const auto& [n, t] : a.down) out[k + "adapter_down.0." + n] = t;
      for (const auto& [n, t] : a.up) out[k + "adapter_up." + n] = t;
      if (a.scale.defined()) out[k + "scaling"] = a.scale;
      for (const auto& [n, t] : a.gate) out[k + "gate." + n] = t;
    }
    for (const auto& [n, t] : shared()) out[shared_prefix_ + n] = t;
    for (const auto& [n, t] : inv_tensors_) out[inv_prefix_ + n] = t;
    return out;
  }

  void load_state(const NamedTensors& tensors) override {
    std::map<std::string, std::pair<std::string, at::Tensor>> ours;  // normalized -> (our key, tensor)
    for (const auto& [k, t] : state()) ours[normalized(k)] = {k, t};
    std::map<std::string, std::string> seen;  // normalized -> the file's key
    for (const auto& [k, t] : tensors) {
      const auto it = ours.find(normalized(k));
      if (it == ours.end())
        throw std::runtime_error("tensor '" + k + "' is not part of this " + kind() + " (" + std::to_string(adapters_.size()) + " adapters, config " + config_ +
                                 "): an adapter of another method, placement or layer count");
      if (!seen.emplace(it->first, k).second) throw std::runtime_error("tensors '" + seen[it->first] + "' and '" + k + "' are the same tensor under two adapter names");
      if (t.sizes() != it->second.second.sizes())
        throw std::runtime_error("tensor '" + k + "' has shape " + c10::str(t.sizes()) + ", expected " + c10::str(it->second.second.sizes()) + " (bottleneck " +
                                 std::to_string(r_) + ")");
    }
    for (const auto& [n, ours_k] : ours)
      if (!seen.count(n)) throw std::runtime_error("adapter lacks tensor '" + ours_k.first + "'");
    at::NoGradGuard no_grad;
    for (const auto& [k, t] : tensors) ours.at(normalized(k)).second.copy_(t);
  }

  // AdapterHub's file name, so that `load_adapter` finds the tensors.
  const void* extension(const char* id) const override { return std::string(id) == TESSERA_EXT_METHOD_FILES ? &files_ : nullptr; }

  // AdapterHub's adapter_config.json: the full BnConfig, so `load_adapter` rebuilds it.
  std::string adapter_config_json() const override {
    const auto H = model_->info().hidden_size;
    nlohmann::json scaling = scaling_type_ == "fixed" ? nlohmann::json(scaling_) : nlohmann::json(scaling_type_);
    std::set<std::string> kinds;
    for (const auto& a : adapters_) kinds.insert(site_kind(a.site->name()));
    const auto left = left_out();
    nlohmann::json c = {{"mh_adapter", kinds.count("attn") != 0}, {"output_adapter", kinds.count("mlp") != 0}, {"cross_adapter", kinds.count("cross") != 0},
                        // an integer where r divides H, as AdapterHub's presets write it (its shared
                        // PHM factors are sized H // reduction_factor, which a float breaks)
                        {"reduction_factor", H % r_ == 0 ? nlohmann::json(H / r_) : nlohmann::json(adapterhub_reduction(H, r_))}, {"non_linearity", act_},
                        {"original_ln_before", preset_->ln_before}, {"original_ln_after", true}, {"ln_before", false}, {"ln_after", false},
                        {"init_weights", init_}, {"init_weights_seed", nullptr}, {"is_parallel", preset_->parallel}, {"scaling", scaling},
                        {"use_gating", gating_}, {"residual_before_ln", residual_before_ln_}, {"adapter_residual_before_ln", false},
                        {"inv_adapter", inv_.empty() ? nlohmann::json() : nlohmann::json(inv_)},
                        {"inv_adapter_reduction_factor", inv_.empty() ? nlohmann::json() : nlohmann::json(inv_rf_)}, {"leave_out", left.first}, {"dropout", dropout_},
                        {"phm_layer", false}, {"stochastic_depth", 0.0}};
    projection_config(c);
    return nlohmann::json{{"config", c}, {"hidden_size", H}, {"model_type", arch_}, {"name", name_}, {"version", "adapters.1.3.0"},
                          // adapterhub_exact false: targets pick sublayers AdapterHub's flags cannot
                          // name (attn in some layers only): it would add adapters we lack
                          {"tessera", {{"preset", config_}, {"bottleneck_size", r_}, {"adapterhub_exact", left.second}, {"inv_adapter_reverse", inv_reverse_}}}}
        .dump(2);
  }

 protected:
  // The plugin's presets, keyed by the `config` value.
  virtual const std::map<std::string, Preset>& presets() const = 0;
  // "bottleneck adapter", "compacter": how refusals name the method.
  virtual const char* kind() const = 0;
  virtual void validate_projections(const Params&) const {}
  // Reads the plugin's own keys, once r_ is known; may refuse r (ParamError naming the key).
  virtual void read_projections(const Params&, std::int64_t H) = 0;
  // One projection's tensors, initialised and requiring grad where they train.
  virtual NamedTensors make(std::int64_t in, std::int64_t out, const std::string& position) = 0;
  // The projection as the adapter runs it, holding its tensors (not this object).
  virtual Projection project(const NamedTensors& p, const std::string& position, c10::ScalarType dtype) const = 0;
  // The tensors all the instance's adapters share, by their names after shared_parameters.<name>.
  virtual NamedTensors shared() const { return {}; }
  // The projection's keys in AdapterHub's config ("phm_layer" and its companions).
  virtual void projection_config(nlohmann::json&) const {}

  // adapter_config.json for a layout AdapterHub does not have (a mixture, a shared adapter
  // with masks): without AdapterHub's "config" and "version" its loader refuses the folder
  // rather than load part of it; the plugin's own keys under tessera.<method>.
  std::string own_layout_config(const char* method, nlohmann::json keys) const {
    auto j = nlohmann::json::parse(Wiring::adapter_config_json());
    j.erase("config");
    j.erase("version");
    j["tessera"][method] = std::move(keys);
    return j.dump(2);
  }

  // Whether the plugin takes invertible_keys() (AdapterHub's BnConfig has them for dense and
  // PHM adapters; the unified methods built on this wiring do not).
  virtual bool offers_invertible() const { return false; }
  static std::vector<ParamSpec> invertible_keys() {
    return {
        {"inv_adapter", ParamType::String, std::string(""),
         "an invertible adapter on the first layer's input (MAD-X): nice, glow or none; empty: the preset's (nice for *_inv)", std::nullopt, std::nullopt,
         {"", "none", "nice", "glow"}},
        {"inv_adapter_reduction_factor", ParamType::Float, 0.0, "its sub-networks' inner width is floor(H/2 / this); 0: 2 (AdapterHub's)", 0.0, std::nullopt, {}},
        {"inv_adapter_reverse", ParamType::Bool, true,
         "apply its inverse before a language-model head (decoders, T5's decoder) as MAD-X and AdapterHub's flexible heads do; false: left out, as "
         "AdapterHub's static heads (AutoModelForCausalLM with adapters.init) leave it",
         std::nullopt, std::nullopt, {}},
    };
  }

  // The keys every AdapterHub bottleneck takes, after the plugin's `config`.
  static std::vector<ParamSpec> wiring_keys() {
    return {
        {"reduction_factor", ParamType::Float, 0.0, "bottleneck r = floor(hidden / reduction_factor); 0: the preset's", 0.0, std::nullopt, {}},
        {"bottleneck_size", ParamType::Int, std::int64_t{0}, "r itself; 0: from reduction_factor", 0, std::nullopt, {}},
        {"non_linearity", ParamType::String, std::string(""), "the activation between the projections; empty: the preset's", std::nullopt, std::nullopt,
         {"", "relu", "swish", "silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "tanh", "leakyrelu", "sigmoid"}},
        {"scaling", ParamType::Float, 0.0, "the fixed scale s of the adapter's output; 0: the preset's", 0.0, std::nullopt, {}},
        {"scaling_type", ParamType::String, std::string(""), "fixed: s = scaling; learned: one trained s (from 1); channel: a trained s per hidden unit; empty: the preset's",
         std::nullopt, std::nullopt, {"", "fixed", "learned", "channel"}},
        {"residual_before_ln", ParamType::Bool, true,
         "sequential adapters: the adapter's residual is the sublayer output before the block's norm (true) or the adapter's input after it", std::nullopt,
         std::nullopt, {}},
        {"cross_adapter", ParamType::Bool, false, "also after T5's cross-attention (default targets only)", std::nullopt, std::nullopt, {}},
        {"dropout", ParamType::Float, 0.0, "dropout on the adapter's output in training", 0.0, 0.99, {}},
        {"use_gating", ParamType::Bool, false,
         "weigh the adapter's output by a learned gate σ(z W_g + b_g) from its input z, averaged over each sample's real tokens (UniPELT; AdapterHub's use_gating)",
         std::nullopt, std::nullopt, {}},
    };
  }

  const Owner* owner_ = nullptr;
  ModelView* model_ = nullptr;
  std::string name_, arch_, config_, act_, init_;
  const Preset* preset_ = nullptr;
  std::int64_t r_ = 0;

 private:
  void read(const Params& p, std::int64_t H) {
    config_ = p.text("config");
    preset_ = &presets().at(config_);
    const double rf = p.number("reduction_factor") > 0 ? p.number("reduction_factor") : preset_->reduction;
    if (p.integer("bottleneck_size") > H)
      throw ParamError("bottleneck_size", "bottleneck_size " + std::to_string(p.integer("bottleneck_size")) + " is larger than the hidden size " + std::to_string(H));
    if (p.integer("bottleneck_size") > 0) {
      r_ = p.integer("bottleneck_size");
    } else {
      if (rf > static_cast<double>(H))
        throw ParamError("reduction_factor", "reduction_factor " + c10::str(rf) + " is larger than the hidden size " + std::to_string(H) + ": no bottleneck is left");
      r_ = std::max<std::int64_t>(1, python_floor_div(static_cast<double>(H), rf));  // AdapterHub: int(H // rf), at least 1
    }
    act_ = p.text("non_linearity").empty() ? preset_->act : p.text("non_linearity");
    init_ = preset_->init;
    scaling_type_ = p.text("scaling_type").empty() ? preset_->scaling_type : p.text("scaling_type");
    scaling_ = p.number("scaling") > 0 ? p.number("scaling") : preset_->scaling;
    residual_before_ln_ = p.flag("residual_before_ln");
    cross_ = p.flag("cross_adapter");
    dropout_ = p.number("dropout");
    gating_ = p.flag("use_gating");
    if (offers_invertible()) {
      inv_ = preset_->inv;
      if (!p.text("inv_adapter").empty()) inv_ = p.text("inv_adapter") == "none" ? "" : p.text("inv_adapter");
      if (p.number("inv_adapter_reduction_factor") > 0) inv_rf_ = p.number("inv_adapter_reduction_factor");
      inv_reverse_ = p.flag("inv_adapter_reverse");
      if (!inv_.empty() && python_floor_div(static_cast<double>(H / 2), inv_rf_) < 1)
        throw ParamError("inv_adapter_reduction_factor", "inv_adapter_reduction_factor " + c10::str(inv_rf_) + " leaves no inner width of half the hidden size (" +
                                                             std::to_string(H / 2) + ")");
    }
    read_projections(p, H);
  }

  // The coupling block's tensors under AdapterHub's names, installed on the embedding site,
  // and its inverse on the output site where a language-model head reads it.
  void install_invertible(std::int64_t H) {
    EmbeddingSite* embed = model_->embedding_site();
    if (embed == nullptr) throw std::runtime_error("inv_adapter: this " + arch_ + " model has no embedding site");
    const std::int64_t h1 = H / 2, h2 = H - h1;
    auto inner = [&](std::int64_t in) { return python_floor_div(static_cast<double>(in), inv_rf_); };  // AdapterHub: int(in // rf)
    const auto& opts = model_->info().param_options;
    if (inv_ == "nice") {
      inv_tensors_ = coupling_net("F", h2, inner(h2), h1, opts);
      for (auto& kv : coupling_net("G", h1, inner(h1), h2, opts)) inv_tensors_.insert(kv);
    } else {
      inv_tensors_ = coupling_net("s1", h1, inner(h1), 2 * h2, opts);
      for (auto& kv : coupling_net("s2", h2, inner(h2), 2 * h1, opts)) inv_tensors_.insert(kv);
    }
    // AdapterHub keeps it on the base model, T5's on its encoder (the only stack it transforms).
    inv_prefix_ = base_prefix(adapters_.front().module) + (arch_ == "t5" ? "encoder." : "") + "invertible_adapters." + name_ + ".";
    const NamedTensors t = inv_tensors_;
    const std::string kind = inv_, act = act_;
    embed->add_transform(*owner_, [=](const at::Tensor& x) { return couple(kind, t, act, x, false); });
    const bool lm_head = arch_ != "bert" && arch_ != "roberta";
    if (inv_reverse_ && lm_head) {
      OutputSite* out = model_->output_site();
      if (out == nullptr) throw std::runtime_error("inv_adapter: this " + arch_ + " model has no output site for the inverse");
      out->add_token_wise_transform(*owner_, [=](const at::Tensor& y) { return couple(kind, t, act, y, true); });  // generation keeps its cache
    }
  }

  // A site's layer as AdapterHub numbers it: T5's decoder layers come after its encoder's.
  std::int64_t adapterhub_layer(const std::string& site) const {
    static const std::regex layer(R"((^|\.)layers\.(\d+)(\.|$))");
    std::smatch m;
    if (!std::regex_search(site, m, layer)) return -1;
    return std::stoll(m[2]) + (site.rfind("decoder.", 0) == 0 ? encoder_layers_ : 0);
  }

  // Layers with no adapter at all, as AdapterHub's leave_out lists them; and whether
  // AdapterHub's flags (a kind on every kept layer) describe exactly the adapters we have.
  std::pair<std::vector<std::int64_t>, bool> left_out() const {
    std::set<std::pair<std::int64_t, std::string>> have;
    std::set<std::string> kinds;
    for (const auto& a : adapters_) {
      have.insert({adapterhub_layer(a.site->name()), site_kind(a.site->name())});
      kinds.insert(site_kind(a.site->name()));
    }
    std::vector<std::int64_t> out;
    bool exact = true;
    for (const auto* l : model_->layer_sites()) {
      const std::int64_t g = adapterhub_layer(l->name());
      const bool decoder = l->name().rfind("decoder.", 0) == 0;
      bool any = false;
      for (const auto& k : {"attn", "mlp", "cross"}) any |= have.count({g, k}) != 0;
      if (!any) {
        out.push_back(g);
        continue;
      }
      for (const auto& k : kinds)
        if ((k != "cross" || decoder) && !have.count({g, k})) exact = false;
    }
    std::sort(out.begin(), out.end());
    return {out, exact};
  }

  // AdapterHub's gate, nn.Linear(H, 1): N(0, 0.02²) and a zero bias under the bert and
  // mam_adapter inits; nn.Linear's own U(±1/√H) under houlsby's, which leaves it alone.
  NamedTensors make_gate(std::int64_t H, const c10::TensorOptions& opts) const {
    at::Tensor w = at::empty({1, H}, opts), b = at::zeros({1}, opts);
    at::NoGradGuard no_grad;
    if (init_ == "houlsby") {
      const double bound = 1.0 / std::sqrt(static_cast<double>(H));
      w.uniform_(-bound, bound), b.uniform_(-bound, bound);
    } else {
      w.normal_(0.0, 0.02);
    }
    return {{"weight", w.set_requires_grad(true)}, {"bias", b.set_requires_grad(true)}};
  }

  void install(const Adapter& a) {
    const auto dtype = model_->info().options.dtype().toScalarType();
    const Projection down = project(a.down, "down", dtype), up = project(a.up, "up", dtype);
    const at::Tensor s = a.scale;
    const at::Tensor gw = a.gate.empty() ? at::Tensor() : a.gate.at("weight"), gb = a.gate.empty() ? at::Tensor() : a.gate.at("bias");
    const std::string act = act_;
    const double fixed = scaling_, p = dropout_;
    ModelView* model = model_;
    // A(z) = dropout(s · up(act(down(z)))) [· its gate], in the compute dtype; z: (..., H), the
    // real tokens' rows (N, H) while the host runs unpadded, which the gate's mean reads.
    auto adapter = [=](const at::Tensor& z) {
      at::Tensor y = up(activate(act, down(z)));
      y = s.defined() ? y * s.to(dtype) : (fixed == 1.0 ? y : y * fixed);
      y = tessera::dropout(y, p, model->training());
      if (!gw.defined()) return y;
      return y * mean_over_tokens_per_row(*model, at::sigmoid(at::linear(z, gw.to(dtype), gb.to(dtype))));  // (..., 1): one gate per sample
    };
    if (preset_->parallel) {
      a.site->add_token_wise_residual(*owner_, [=](const at::Tensor& h, const at::Tensor& x, const TensorMap&) { return h + adapter(x); });
      return;
    }
    const bool ln_before = preset_->ln_before, residual_h = residual_before_ln_;
    a.site->add_token_wise_residual(*owner_, [=](const at::Tensor& h, const at::Tensor& x, const TensorMap& norm) {
      const at::Tensor z = ln_before ? norm(h + x) : h;
      return adapter(z) + (residual_h ? h : z);
    });
  }

  std::string scaling_type_, shared_prefix_, inv_, inv_prefix_;
  double inv_rf_ = 2.0;
  bool inv_reverse_ = true;
  NamedTensors inv_tensors_;
  std::int64_t encoder_layers_ = 0;
  double scaling_ = 1.0, dropout_ = 0.0;
  bool residual_before_ln_ = true, cross_ = false, gating_ = false;
  std::vector<Adapter> adapters_;
  tessera_method_files_v1 files_{{sizeof(tessera_method_files_v1), 1}, "adapter.safetensors"};
};

}  // namespace tessera::adapterhub_bn
