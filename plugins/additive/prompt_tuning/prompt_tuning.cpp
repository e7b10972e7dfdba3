// Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
// Tuning", arXiv:2104.08691). The math and every key: README.md beside this.
//
//   e = [p_1 ; … ; p_P ; embed(x)]      p: (P, H) trainable, the rest of the model frozen
//
// P virtual-token embeddings in front of the input's word embeddings, at the embedding site:
// the host extends the attention mask, labels and positions (a prompt token takes positions
// 0 … P − 1, the text follows, as transformers numbers inputs_embeds). T5: the encoder's input.
// Initialised as PEFT does: N(0, 1), rows of the word embedding at token ids drawn uniformly,
// or the embedding of a text tokenized with the model's special tokens, cycled to P rows.
// Files: PEFT's `prompt_embeddings` (P · submodules, H).
#include "../peft_prompt.h"

#include <tessera/extensions.h>
#include <tessera/plugin.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cctype>

namespace {

using tessera::Tensor;

std::string upper(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  return s;
}

class PromptTuning final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    auto params = tessera::peft_prompt::common_params();
    params.push_back({"prompt_tuning_init", ParamType::String, std::string("RANDOM"),
                      "RANDOM: N(0, 1); SAMPLE_VOCAB: word embeddings of uniformly drawn token ids; TEXT: the embedding of prompt_tuning_init_text",
                      std::nullopt, std::nullopt, {"RANDOM", "SAMPLE_VOCAB", "TEXT", "random", "sample_vocab", "text"}});
    params.push_back({"prompt_tuning_init_text", ParamType::String, std::string(), "the text for TEXT init, tokenized by the run's tokenizer with its special tokens",
                      std::nullopt, std::nullopt, {}});
    params.push_back({"tokenizer_name_or_path", ParamType::String, std::string(),
                      "PEFT's record of the tokenizer behind a TEXT init (written to adapter_config.json); Tessera uses the run's", std::nullopt,
                      std::nullopt, {}});
    return {params};
  }

  void validate(const tessera::Params& p) const override {
    if (upper(p.text("prompt_tuning_init")) == "TEXT" && p.text("prompt_tuning_init_text").empty())
      throw tessera::ParamError("prompt_tuning_init_text", "prompt_tuning_init = \"TEXT\" needs a prompt_tuning_init_text");
    if (upper(p.text("prompt_tuning_init")) != "TEXT" && !p.text("prompt_tuning_init_text").empty())
      throw tessera::ParamError("prompt_tuning_init_text", "prompt_tuning_init_text is read only with prompt_tuning_init = \"TEXT\"");
  }

  void attach(tessera::AttachContext& ctx) override {
    if (!ctx.targets.empty()) throw std::runtime_error("prompt tuning has no targets: its prompt goes in front of the input");
    auto* embed = ctx.model.embedding_site();
    if (embed == nullptr) throw std::runtime_error("a " + ctx.model.info().architecture + " model has no embedding site for a prompt");
    info_ = ctx.model.info();
    P_ = ctx.params.integer("num_virtual_tokens");
    submodules_ = tessera::peft_prompt::submodules(ctx.params, info_);
    layers_ = tessera::peft_prompt::peft_layers(ctx.model);
    init_ = upper(ctx.params.text("prompt_tuning_init"));
    text_ = ctx.params.text("prompt_tuning_init_text");
    tokenizer_path_ = ctx.params.text("tokenizer_name_or_path");
    const auto H = embed->hidden_size(), rows = P_ * submodules_;
    table_ = at::empty({rows, H}, info_.param_options);
    {
      at::NoGradGuard no_grad;
      if (init_ == "RANDOM") table_.normal_();
      else table_.copy_(word_rows(ctx, rows));
    }
    table_.set_requires_grad(true);
    const Tensor t = table_;
    const auto P = P_;
    const auto dtype = info_.options.dtype();
    // (B, P, H): the first P rows (T5's second block is PEFT's, unused by its forward too).
    embed->add_prompt(ctx.owner, [t, P, dtype](std::int64_t B) { return t.narrow(0, 0, P).to(dtype).unsqueeze(0).expand({B, P, t.size(1)}); });
  }

  tessera::NamedTensors trainable() override { return {{"prompt_embeddings", table_}}; }
  tessera::NamedTensors state() override { return {{"prompt_embeddings", table_}}; }

  void load_state(const tessera::NamedTensors& tensors) override { tessera::peft_prompt::load_table(tensors, table_, P_, submodules_); }

  std::string adapter_config_json() const override {
    auto j = tessera::peft_prompt::config("PROMPT_TUNING", info_, P_, submodules_, layers_, info_.num_heads, info_.hidden_size);
    j["prompt_tuning_init"] = init_;
    j["prompt_tuning_init_text"] = init_ == "TEXT" ? nlohmann::json(text_) : nlohmann::json(nullptr);
    // PEFT refuses a TEXT config without a tokenizer name, though a saved adapter never reads it.
    j["tokenizer_name_or_path"] = !tokenizer_path_.empty() ? nlohmann::json(tokenizer_path_) : init_ == "TEXT" ? nlohmann::json(tokenizer_from_run_) : nlohmann::json(nullptr);
    j["tokenizer_kwargs"] = nullptr;
    return j.dump(2);
  }

 private:
  // Rows of the frozen word embedding: at `rows` uniformly drawn ids, or at the init text's
  // ids cycled (or cut) to `rows`, as PEFT builds them. (rows, H) f32.
  Tensor word_rows(tessera::AttachContext& ctx, std::int64_t rows) {
    const auto words = ctx.model.match_parameters({"embed.word.weight"});
    if (words.size() != 1) throw std::runtime_error("the model has no word embedding 'embed.word.weight' to initialise the prompt from");
    const Tensor w = words[0]->base();  // (V, H)
    Tensor ids;
    if (init_ == "SAMPLE_VOCAB") {
      ids = at::randint(w.size(0), {rows}, at::TensorOptions().dtype(at::kLong)).to(w.device());
    } else {
      const auto* tok = tessera::host_extension<tessera_host_tokenizer_v2>(ctx.model, TESSERA_EXT_HOST_TOKENIZER, 2);
      if (tok == nullptr)
        throw std::runtime_error("prompt_tuning_init = \"TEXT\" needs the run's tokenizer, which this host does not offer (tessera.host.tokenizer v2)");
      const auto text_ids = tok->encode_with_special(tok->host, text_);
      if (text_ids.empty()) throw tessera::ParamError("prompt_tuning_init_text", "prompt_tuning_init_text '" + text_ + "' tokenizes to no token");
      std::vector<std::int64_t> cycled;
      for (std::int64_t i = 0; i < rows; ++i) cycled.push_back(text_ids[static_cast<std::size_t>(i) % text_ids.size()]);
      ids = at::tensor(cycled, at::TensorOptions().dtype(at::kLong)).to(w.device());
      tokenizer_from_run_ = "(the base model's tokenizer)";
    }
    return w.index_select(0, ids).to(at::kFloat);
  }

  tessera::ModelInfo info_;
  std::int64_t P_ = 0, submodules_ = 1, layers_ = 0;
  std::string init_, text_, tokenizer_path_, tokenizer_from_run_;
  Tensor table_;  // (P · submodules, H) f32 master
};

}  // namespace

TESSERA_PLUGIN(PromptTuning, "prompt_tuning", "1.0.0", "additive", "Trainable virtual-token embeddings in front of the input (prompt tuning)",
               "Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning, arXiv:2104.08691")
