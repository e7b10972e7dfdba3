// `tessera sites`: the sites of a model as plugins see them (sdk/include/tessera/sites.h).
#include "cli/sites.h"

#include "model/bert.h"
#include "model/decoder.h"
#include "model/json_file.h"
#include "model/t5.h"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <sstream>

namespace tessera {
namespace {

std::string shape(const Tensor& t) {
  std::ostringstream o;
  o << "(";
  for (std::int64_t i = 0; i < t.dim(); ++i) o << (i ? ", " : "") << t.size(i);
  o << ")";
  return o.str();
}

std::unique_ptr<SiteModel> load_any(const std::string& dir) {
  const auto type = read_json_file((std::filesystem::path(dir) / "config.json").string()).value("model_type", "");
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  if (type == "t5") return T5Model::load(dir, opts);
  if (type == "bert" || type == "roberta") return BertModel::load(dir, opts);
  return DecoderModel::load(dir, opts);  // refuses, naming model_type, what it does not know
}

}  // namespace

std::size_t print_sites(const std::string& model_dir, const std::string& pattern, std::ostream& out) {
  auto model = load_any(model_dir);
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
  for (auto* p : model->parameter_sites()) line("parameter", p->name(), p->hf_name(), shape(p->base()), "delta");
  if (auto* o = model->output_site()) line("output", o->name(), o->hf_path(), "hidden " + std::to_string(o->hidden_size()), "transform");
  return n;
}

}  // namespace tessera
