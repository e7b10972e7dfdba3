#include "architectures/backbone.h"

#include "architectures/bert.h"
#include "architectures/decoder.h"
#include "architectures/t5.h"
#include "formats/checkpoint.h"
#include "formats/json_file.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <stdexcept>

namespace tessera {

const char* to_string(BackboneKind kind) {
  switch (kind) {
    case BackboneKind::Encoder: return "an encoder";
    case BackboneKind::Decoder: return "a decoder-only model";
    case BackboneKind::EncoderDecoder: return "an encoder-decoder";
  }
  return "?";
}

namespace {

std::runtime_error no_lm(const Backbone& b) {
  return std::runtime_error(b.sites().info().architecture + " is " + to_string(b.kind()) + ": it has no language-model head");
}

class BertBackbone final : public Backbone {
 public:
  explicit BertBackbone(std::unique_ptr<BertModel> m) : m_(std::move(m)) { ids_.pad = m_->config().pad_token_id; }
  BackboneKind kind() const override { return BackboneKind::Encoder; }
  SiteModel& sites() override { return *m_; }
  const SpecialIds& special_ids() const override { return ids_; }
  std::int64_t max_tokens() const override { return m_->max_tokens(); }
  Encoded encode(const Tensor& ids, const Tensor& mask) const override { return m_->forward(ids, mask); }

 private:
  std::unique_ptr<BertModel> m_;
  SpecialIds ids_;
};

class DecoderBackbone final : public Backbone {
 public:
  explicit DecoderBackbone(std::unique_ptr<DecoderModel> m) : m_(std::move(m)) {
    const auto& c = m_->config();
    ids_.pad = c.pad_token_id, ids_.bos = c.bos_token_id, ids_.eos = c.eos_token_ids;
  }
  BackboneKind kind() const override { return BackboneKind::Decoder; }
  SiteModel& sites() override { return *m_; }
  const SpecialIds& special_ids() const override { return ids_; }
  std::int64_t max_tokens() const override { return m_->max_tokens(); }
  Encoded encode(const Tensor& ids, const Tensor& mask) const override {
    Encoded e;
    e.hidden = m_->forward(ids, mask);  // (B, P + T, H)
    e.prompt_length = e.hidden.size(1) - ids.size(1);
    e.mask = e.prompt_length == 0 ? mask : at::cat({at::ones({ids.size(0), e.prompt_length}, mask.options()), mask}, 1);
    return e;
  }
  Tensor lm_states(const Tensor& ids, const Tensor& mask, const Tensor&) const override {
    Encoded e = encode(ids, mask);
    return e.hidden.narrow(1, e.prompt_length, ids.size(1));  // (B, T, H)
  }
  LinearSiteImpl& lm_head() const override { return m_->head(); }
  std::vector<std::vector<std::int64_t>> generate(const std::vector<std::vector<std::int64_t>>& prompts, GenerateOptions o) const override {
    o.eos_token_ids = ids_.eos;
    o.pad_token_id = std::max<std::int64_t>(0, ids_.pad);  // left padding never reaches a real token
    return tessera::generate(*m_, prompts, o);
  }

 private:
  std::unique_ptr<DecoderModel> m_;
  SpecialIds ids_;
};

class T5Backbone final : public Backbone {
 public:
  explicit T5Backbone(std::unique_ptr<T5Model> m) : m_(std::move(m)) {
    const auto& c = m_->config();
    ids_.pad = c.pad_token_id, ids_.decoder_start = c.decoder_start_token_id, ids_.eos = {c.eos_token_id};
  }
  BackboneKind kind() const override { return BackboneKind::EncoderDecoder; }
  SiteModel& sites() override { return *m_; }
  const SpecialIds& special_ids() const override { return ids_; }
  std::int64_t max_tokens() const override { return 0; }  // relative position buckets
  Encoded encode(const Tensor& ids, const Tensor& mask) const override { return m_->encode(ids, mask); }
  Tensor lm_states(const Tensor& ids, const Tensor& mask, const Tensor& decoder_ids) const override {
    return m_->head_input(m_->decode(decoder_ids, m_->encode(ids, mask)));  // (B, U, d)
  }
  LinearSiteImpl& lm_head() const override { return m_->head(); }
  std::vector<std::vector<std::int64_t>> generate(const std::vector<std::vector<std::int64_t>>& sources, GenerateOptions o) const override {
    o.eos_token_ids = ids_.eos;
    o.pad_token_id = ids_.pad;
    return tessera::generate(*m_, sources, o);
  }

 private:
  std::unique_ptr<T5Model> m_;
  SpecialIds ids_;
};

}  // namespace

Tensor Backbone::lm_states(const Tensor&, const Tensor&, const Tensor&) const { throw no_lm(*this); }
LinearSiteImpl& Backbone::lm_head() const { throw no_lm(*this); }
std::vector<std::vector<std::int64_t>> Backbone::generate(const std::vector<std::vector<std::int64_t>>&, GenerateOptions) const {
  throw no_lm(*this);
}

std::unique_ptr<Backbone> load_backbone(const std::string& dir, c10::TensorOptions options, bool stream_blocks) {
  if (is_gguf_file(dir)) return std::make_unique<DecoderBackbone>(DecoderModel::load(dir, options, stream_blocks));  // a LLaMA GGUF (formats/gguf_llama.h)
  const std::string path = (std::filesystem::path(dir) / "config.json").string();
  const nlohmann::json config = read_json_file(path);
  if (!config.is_object()) throw std::runtime_error(path + ": must be a JSON object");
  const std::string type = JsonFields(config, path).string_or("model_type", "");
  if (type == "bert" || type == "roberta") return std::make_unique<BertBackbone>(BertModel::load(dir, options));
  if (type == "t5") return std::make_unique<T5Backbone>(T5Model::load(dir, options));
  if (type == "gpt2" || type == "llama" || type == "mistral" || type == "qwen2") return std::make_unique<DecoderBackbone>(DecoderModel::load(dir, options));
  throw std::runtime_error(path + ": model_type \"" + type + "\" is not supported (encoders: bert, roberta; decoders: gpt2, llama, mistral, qwen2; encoder-decoder: t5)");
}

}  // namespace tessera
