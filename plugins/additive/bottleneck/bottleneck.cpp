// Bottleneck adapters: small MLPs inside each transformer block (Houlsby et al. 2019,
// "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751; Pfeiffer et al. 2021,
// "AdapterFusion", arXiv:2005.00247; He et al. 2022, "Towards a Unified View of
// Parameter-Efficient Transfer Learning", arXiv:2110.04366), placed and wired as
// AdapterHub's `adapters` package does (its presets seq_bn, double_seq_bn, par_bn,
// scaled_par_bn). The math and every key: README.md beside this.
//
//   A(z) = s · (W_up act(W_down z + b_down) + b_up)          W_down: (r, H), W_up: (H, r)
//   sequential:  z = N(h + x) (Pfeiffer) or h (Houlsby);  h' = A(z) + (h, or z)
//   parallel:    h' = h + A(x)
//
// h: the sublayer's output before its residual add; x: the residual stream it is added to;
// N: the block's own norm after that add (identity in pre-norm blocks). The block then
// computes N(x + h') as always (SDK 2.3's residual module).
#include <tessera/dropout.h>
#include <tessera/extensions.h>
#include <tessera/plugin.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <map>
#include <algorithm>
#include <regex>
#include <set>

namespace {

using tessera::Tensor;

// AdapterHub's presets (adapters.configuration.adapter_config): where the adapters go and
// the defaults of the keys a user may override.
struct Preset {
  bool parallel, ln_before;
  double reduction, scaling;
  const char *act, *init, *scaling_type;
  std::vector<std::string> targets;  // sublayer sites: "attn" (mh_adapter), "mlp" (output_adapter)
};
const std::map<std::string, Preset>& presets() {
  static const std::map<std::string, Preset> p = {
      {"seq_bn", {false, true, 16, 1.0, "relu", "bert", "fixed", {"mlp"}}},               // Pfeiffer
      {"double_seq_bn", {false, false, 16, 1.0, "swish", "bert", "fixed", {"attn", "mlp"}}},  // Houlsby
      {"par_bn", {true, false, 2, 4.0, "relu", "mam_adapter", "fixed", {"mlp"}}},         // He et al.
      {"scaled_par_bn", {true, false, 2, 4.0, "relu", "mam_adapter", "learned", {"mlp"}}},
  };
  return p;
}

// transformers' ACT2FN, which AdapterHub's adapters use.
Tensor activate(const std::string& name, const Tensor& x) {
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
std::int64_t python_floor_div(double a, double b) {
  const double mod = std::fmod(a, b);
  double div = (a - mod) / b;
  const double floor_div = std::floor(div);
  if (div - floor_div > 0.5) div = floor_div + 1.0;  // CPython's correction of the quotient
  else div = floor_div;
  return static_cast<std::int64_t>(div);
}

// A reduction factor AdapterHub maps back to r (int(H // rf) == r): H / r when r divides H,
// else H / (r + ½), which no rounding moves off r.
double adapterhub_reduction(std::int64_t H, std::int64_t r) {
  return H % r == 0 ? static_cast<double>(H / r) : static_cast<double>(H) / (static_cast<double>(r) + 0.5);
}

struct Adapter {
  tessera::SublayerSite* site;
  std::string module;        // AdapterHub's module path of the adapter ("encoder.layer.0.output")
  Tensor down_w, down_b;     // (r, H), (r)
  Tensor up_w, up_b;         // (H, r), (H)
  Tensor scale;              // learned: (1) or (H); undefined when fixed
};

// The module that holds AdapterHub's adapter for a sublayer site, from the site's HF path:
// BERT keeps them in attention.output / output, decoders in the block's
// attention_adapters / output_adapters, T5 in the block's layer.i.
// A sublayer site's kind, the last part of its name: attn, mlp, or T5's cross.
std::string site_kind(const std::string& site) { return site.substr(site.rfind('.') + 1); }

std::string adapterhub_module(const std::string& arch, const tessera::SublayerSite& s) {
  const std::string& hf = s.hf_path();
  const bool attn = site_kind(s.name()) == "attn";
  const std::string parent = hf.substr(0, hf.rfind('.'));
  if (arch == "bert" || arch == "roberta") return attn ? hf + ".output" : hf;
  if (arch == "t5") return parent;
  return parent + (attn ? ".attention_adapters" : ".output_adapters");
}

// A file key with the model's base prefix and the adapter's name taken out, so that an
// adapter saved from another model class (BertModel or BertAdapterModel) or under another
// name matches: "bert.encoder.layer.0.output.adapters.x.adapter_up.weight" ->
// "encoder.layer.0.output.adapters.*.adapter_up.weight".
std::string normalized(const std::string& key) {
  static const std::regex name(R"(\.adapters\.[^.]+\.)");
  std::string k = std::regex_replace(key, name, ".adapters.*.", std::regex_constants::format_first_only);
  for (const char* prefix : {"bert.", "roberta.", "transformer.", "model."})
    if (k.rfind(prefix, 0) == 0) return k.substr(std::string(prefix).size());
  return k;
}

class Bottleneck final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    return {{
        {"config", ParamType::String, std::string("seq_bn"),
         "AdapterHub's preset: seq_bn (Pfeiffer), double_seq_bn (Houlsby), par_bn (He et al.'s parallel adapter), scaled_par_bn (with a learned scale)",
         std::nullopt, std::nullopt, {"seq_bn", "double_seq_bn", "par_bn", "scaled_par_bn"}},
        {"reduction_factor", ParamType::Float, 0.0, "bottleneck r = floor(hidden / reduction_factor); 0: the preset's (16, or 2 for the parallel ones)",
         0.0, std::nullopt, {}},
        {"bottleneck_size", ParamType::Int, std::int64_t{0}, "r itself; 0: from reduction_factor", 0, std::nullopt, {}},
        {"non_linearity", ParamType::String, std::string(""), "the activation between the projections; empty: the preset's (relu, or swish for double_seq_bn)",
         std::nullopt, std::nullopt, {"", "relu", "swish", "silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "tanh", "leakyrelu", "sigmoid"}},
        {"init_weights", ParamType::String, std::string(""),
         "bert: N(0, 0.02) weights; mam_adapter: Kaiming-uniform down, zero up (starts at the base model); houlsby: truncated N(0, 0.01); empty: the preset's",
         std::nullopt, std::nullopt, {"", "bert", "mam_adapter", "houlsby"}},
        {"scaling", ParamType::Float, 0.0, "the fixed scale s of the adapter's output; 0: the preset's (1, or 4 for the parallel ones)", 0.0, std::nullopt, {}},
        {"scaling_type", ParamType::String, std::string(""), "fixed: s = scaling; learned: one trained s (from 1); channel: a trained s per hidden unit; empty: the preset's",
         std::nullopt, std::nullopt, {"", "fixed", "learned", "channel"}},
        {"residual_before_ln", ParamType::Bool, true,
         "sequential adapters: the adapter's residual is the sublayer output before the block's norm (true) or the adapter's input after it", std::nullopt,
         std::nullopt, {}},
        {"cross_adapter", ParamType::Bool, false, "also after T5's cross-attention (default targets only)", std::nullopt, std::nullopt, {}},
        {"dropout", ParamType::Float, 0.0, "dropout on the adapter's output in training", 0.0, 0.99, {}},
    }};
  }

  void validate(const tessera::Params& p) const override {
    if (p.number("reduction_factor") > 0 && p.integer("bottleneck_size") > 0)
      throw tessera::ParamError("bottleneck_size", "give reduction_factor or bottleneck_size, not both");
    if (p.number("scaling") > 0) {
      const std::string type = p.text("scaling_type").empty() ? presets().at(p.text("config")).scaling_type : p.text("scaling_type");
      if (type != "fixed") throw tessera::ParamError("scaling", "a " + type + " scale starts at 1 and is trained: scaling applies to scaling_type = \"fixed\"");
    }
  }

  void attach(tessera::AttachContext& ctx) override {
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
      Adapter a{site, adapterhub_module(arch_, *site), at::empty({r_, H}, opts), at::zeros({r_}, opts), at::empty({H, r_}, opts), at::zeros({H}, opts), {}};
      init(a);
      if (scaling_type_ != "fixed") a.scale = at::ones({scaling_type_ == "channel" ? H : 1}, opts);
      for (Tensor* t : {&a.down_w, &a.down_b, &a.up_w, &a.up_b, &a.scale})
        if (t->defined()) t->set_requires_grad(true);
      adapters_.push_back(std::move(a));
    }
    if (adapters_.empty()) throw std::runtime_error("no sublayer site of this " + arch_ + " model matches the targets");
    for (const auto& a : adapters_) install(a);
  }

  tessera::NamedTensors trainable() override {
    tessera::NamedTensors out;
    for (const auto& [k, t] : state()) out[k] = t;
    return out;
  }

  // AdapterHub's keys: <module>.adapters.<name>.{adapter_down.0,adapter_up}.{weight,bias}[, .scaling]
  tessera::NamedTensors state() override {
    tessera::NamedTensors out;
    for (const auto& a : adapters_) {
      const std::string k = a.module + ".adapters." + name_ + ".";
      out[k + "adapter_down.0.weight"] = a.down_w;
      out[k + "adapter_down.0.bias"] = a.down_b;
      out[k + "adapter_up.weight"] = a.up_w;
      out[k + "adapter_up.bias"] = a.up_b;
      if (a.scale.defined()) out[k + "scaling"] = a.scale;
    }
    return out;
  }

  void load_state(const tessera::NamedTensors& tensors) override {
    std::map<std::string, std::pair<std::string, Tensor>> ours;  // normalized -> (our key, tensor)
    for (const auto& [k, t] : state()) ours[normalized(k)] = {k, t};
    std::map<std::string, std::string> seen;  // normalized -> the file's key
    for (const auto& [k, t] : tensors) {
      const auto it = ours.find(normalized(k));
      if (it == ours.end())
        throw std::runtime_error("tensor '" + k + "' is not part of this bottleneck adapter (" + std::to_string(adapters_.size()) + " adapters, config " +
                                 config_ + "): an adapter of another method, placement or layer count");
      if (!seen.emplace(it->first, k).second) throw std::runtime_error("tensors '" + seen[it->first] + "' and '" + k + "' are the same tensor under two adapter names");
      if (t.sizes() != it->second.second.sizes())
        throw std::runtime_error("tensor '" + k + "' has shape " + c10::str(t.sizes()) + ", expected " + c10::str(it->second.second.sizes()) +
                                 " (bottleneck " + std::to_string(r_) + ")");
    }
    for (const auto& [n, ours_k] : ours)
      if (!seen.count(n)) throw std::runtime_error("adapter lacks tensor '" + ours_k.first + "'");
    at::NoGradGuard no_grad;
    for (const auto& [k, t] : tensors) ours.at(normalized(k)).second.copy_(t);
  }

  // AdapterHub's file name, so that `load_adapter` finds the tensors.
  const void* extension(const char* id) const override {
    return std::string(id) == TESSERA_EXT_METHOD_FILES ? &files_ : nullptr;
  }

  // AdapterHub's adapter_config.json: the full BnConfig, so `load_adapter` rebuilds it.
  std::string adapter_config_json() const override {
    const auto H = model_->info().hidden_size;
    nlohmann::json scaling = scaling_type_ == "fixed" ? nlohmann::json(scaling_) : nlohmann::json(scaling_type_);
    std::set<std::string> kinds;
    for (const auto& a : adapters_) kinds.insert(site_kind(a.site->name()));
    const auto left = left_out();
    nlohmann::json c = {{"mh_adapter", kinds.count("attn") != 0}, {"output_adapter", kinds.count("mlp") != 0}, {"cross_adapter", kinds.count("cross") != 0},
                        {"reduction_factor", adapterhub_reduction(H, r_)}, {"non_linearity", act_},
                        {"original_ln_before", preset_->ln_before}, {"original_ln_after", true}, {"ln_before", false}, {"ln_after", false},
                        {"init_weights", init_}, {"init_weights_seed", nullptr}, {"is_parallel", preset_->parallel}, {"scaling", scaling},
                        {"use_gating", false}, {"residual_before_ln", residual_before_ln_}, {"adapter_residual_before_ln", false},
                        {"inv_adapter", nullptr}, {"inv_adapter_reduction_factor", nullptr}, {"leave_out", left.first}, {"dropout", dropout_},
                        {"phm_layer", false}, {"stochastic_depth", 0.0}};
    return nlohmann::json{{"config", c}, {"hidden_size", H}, {"model_type", arch_}, {"name", name_}, {"version", "adapters.1.3.0"},
                          // adapterhub_exact false: targets pick sublayers AdapterHub's flags cannot
                          // name (attn in some layers only): it would add adapters we lack
                          {"tessera", {{"preset", config_}, {"bottleneck_size", r_}, {"adapterhub_exact", left.second}}}}
        .dump(2);
  }

 private:
  void read(const tessera::Params& p, std::int64_t H) {
    config_ = p.text("config");
    preset_ = &presets().at(config_);
    const double rf = p.number("reduction_factor") > 0 ? p.number("reduction_factor") : preset_->reduction;
    if (p.integer("bottleneck_size") > H)
      throw tessera::ParamError("bottleneck_size", "bottleneck_size " + std::to_string(p.integer("bottleneck_size")) + " is larger than the hidden size " + std::to_string(H));
    if (p.integer("bottleneck_size") > 0) {
      r_ = p.integer("bottleneck_size");
    } else {
      if (rf > static_cast<double>(H))
        throw tessera::ParamError("reduction_factor", "reduction_factor " + c10::str(rf) + " is larger than the hidden size " + std::to_string(H) + ": no bottleneck is left");
      r_ = std::max<std::int64_t>(1, python_floor_div(static_cast<double>(H), rf));  // AdapterHub: int(H // rf), at least 1
    }
    act_ = p.text("non_linearity").empty() ? preset_->act : p.text("non_linearity");
    init_ = p.text("init_weights").empty() ? preset_->init : p.text("init_weights");
    scaling_type_ = p.text("scaling_type").empty() ? preset_->scaling_type : p.text("scaling_type");
    scaling_ = p.number("scaling") > 0 ? p.number("scaling") : preset_->scaling;
    residual_before_ln_ = p.flag("residual_before_ln");
    cross_ = p.flag("cross_adapter");
    dropout_ = p.number("dropout");
  }

  // AdapterHub's three initialisations (Adapter.__init__).
  void init(Adapter& a) const {
    at::NoGradGuard no_grad;
    if (init_ == "bert") {
      a.down_w.normal_(0.0, 0.02);
      a.up_w.normal_(0.0, 0.02);
    } else if (init_ == "mam_adapter") {  // kaiming_uniform_(a=√5): U(±1/√fan_in), as nn.Linear's default
      const double bound = 1.0 / std::sqrt(static_cast<double>(a.down_w.size(1)));
      a.down_w.uniform_(-bound, bound);
      a.up_w.zero_();
    } else {  // houlsby: N(0, 0.01) truncated at ±2σ
      for (Tensor* w : {&a.down_w, &a.up_w}) {
        w->normal_(0.0, 0.01);
        while (true) {
          const Tensor out = w->abs() > 0.02;
          if (!out.any().item<bool>()) break;
          w->masked_scatter_(out, at::randn({out.sum().item<std::int64_t>()}, w->options()) * 0.01);
        }
      }
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
    const auto layers = model_->layer_sites();
    for (const auto* l : layers) {
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

  void install(const Adapter& a) {
    const auto dtype = model_->info().options.dtype().toScalarType();
    const Tensor dw = a.down_w, db = a.down_b, uw = a.up_w, ub = a.up_b, s = a.scale;
    const std::string act = act_;
    const double fixed = scaling_, p = dropout_;
    tessera::ModelView* model = model_;
    // A(z) = dropout(s · (W_up act(W_down z + b_down) + b_up)), in the compute dtype.
    auto adapter = [=](const Tensor& z) {
      Tensor y = at::linear(activate(act, at::linear(z, dw.to(dtype), db.to(dtype))), uw.to(dtype), ub.to(dtype));
      y = s.defined() ? y * s.to(dtype) : (fixed == 1.0 ? y : y * fixed);
      return tessera::dropout(y, p, model->training());
    };
    if (preset_->parallel) {
      a.site->add_token_wise_residual(*owner_, [=](const Tensor& h, const Tensor& x, const tessera::TensorMap&) { return h + adapter(x); });
      return;
    }
    const bool ln_before = preset_->ln_before, residual_h = residual_before_ln_;
    a.site->add_token_wise_residual(*owner_, [=](const Tensor& h, const Tensor& x, const tessera::TensorMap& norm) {
      const Tensor z = ln_before ? norm(h + x) : h;
      return adapter(z) + (residual_h ? h : z);
    });
  }

  const tessera::Owner* owner_ = nullptr;
  tessera::ModelView* model_ = nullptr;
  std::string name_, arch_, config_, act_, init_, scaling_type_;
  const Preset* preset_ = nullptr;
  std::int64_t r_ = 0, encoder_layers_ = 0;
  double scaling_ = 1.0, dropout_ = 0.0;
  bool residual_before_ln_ = true, cross_ = false;
  std::vector<Adapter> adapters_;
  tessera_method_files_v1 files_{{sizeof(tessera_method_files_v1), 1}, "adapter.safetensors"};
};

}  // namespace

TESSERA_PLUGIN(Bottleneck, "bottleneck", "1.0.0", "additive",
               "Bottleneck adapters in AdapterHub's placements: sequential (Houlsby, Pfeiffer) and parallel (He et al.)",
               "Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2021, arXiv:2005.00247; He et al. 2022, arXiv:2110.04366")
