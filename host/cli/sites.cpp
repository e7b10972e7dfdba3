// `tessera sites`: the sites of a model as plugins see them (sdk/include/tessera/sites.h).
#include "cli/sites.h"

#include "architectures/backbone.h"
#include "cli/commands.h"

#include <ATen/ATen.h>

#include <iostream>
#include <memory>
#include <sstream>

namespace tessera {
namespace {

std::string shape(c10::IntArrayRef sizes) {
  std::ostringstream o;
  o << "(";
  for (std::size_t i = 0; i < sizes.size(); ++i) o << (i ? ", " : "") << sizes[i];
  o << ")";
  return o.str();
}

}  // namespace

std::size_t print_sites(const std::string& model_dir, const std::string& pattern, std::ostream& out) {
  auto backbone = load_backbone(model_dir, at::TensorOptions().dtype(at::kFloat));
  SiteModel* model = &backbone->sites();
  std::size_t n = 0;
  auto line = [&](const char* kind, const std::string& name, const std::string& hf, const std::string& what, const char* accepts) {
    if (!pattern.empty() && !matches_any({pattern}, name, hf)) return;
    out << kind << "  " << name << "  " << hf << "  " << what << "  accepts: " << accepts << "\n";
    ++n;
  };
  if (auto* e = model->embedding_site())
    line("embedding", e->name(), e->hf_path(), "hidden " + std::to_string(e->hidden_size()), "prompt (soft prompt tokens prepended), tap");
  for (auto* s : model->layer_sites()) line("layer", s->name(), s->hf_path(), "index " + std::to_string(s->index()), "tap, router");
  for (auto* s : model->attention_sites())
    line("attention", s->name(), s->hf_path(), std::to_string(s->num_heads()) + " heads x " + std::to_string(s->head_dim()), "prefix, score_hook");
  for (auto* s : model->sublayer_sites())
    line("sublayer", s->name(), s->hf_path(), "hidden " + std::to_string(s->hidden_size()), "sequential, parallel, gate");
  for (auto* s : model->linear_sites())
    line("linear", s->name(), s->hf_path(), std::to_string(s->in_features()) + " -> " + std::to_string(s->out_features()) + (s->bias() ? ", bias" : ""),
         "weight_delta, input_scale, output_scale, branch");
  for (auto* p : model->parameter_sites()) line("parameter", p->name(), p->hf_name(), shape(ParameterSiteImpl::of(*p).sizes()), "delta");
  if (auto* o = model->output_site()) line("output", o->name(), o->hf_path(), "hidden " + std::to_string(o->hidden_size()), "transform");
  return n;
}

Command sites_command() {
  struct Args {
    std::string model, pattern;
  };
  auto a = std::make_shared<Args>();
  return {"sites", "list a model's sites: what method targets name, with shapes and the interventions each accepts",
          [a](CLI::App& c) {
            c.add_option("model", a->model, "Hugging Face model directory")->required()->check(CLI::ExistingDirectory);
            c.add_option("pattern", a->pattern, "only sites matching this target (\"attn.q\", \"query\", a glob, \"re:<regex>\")");
          },
          [a](const PluginRegistry&) {
            if (print_sites(a->model, a->pattern, std::cout) == 0) throw std::runtime_error("no site of " + a->model + " matches '" + a->pattern + "'");
            return 0;
          }};
}

}  // namespace tessera
