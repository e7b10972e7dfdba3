#include "train/session.h"

#include "model/json_file.h"
#include "model/safetensors.h"
#include "model/generate.h"
#include "runtime/device.h"
#include "train/head_loss.h"
#include "train/run_dir.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

namespace tessera {
namespace fs = std::filesystem;

c10::TensorOptions options_for(const ModelConfig& m) {
  const c10::Device device(m.device);
  prepare_device(device);
  return c10::TensorOptions().dtype(m.dtype == "bf16" ? at::kBFloat16 : at::kFloat).device(device);
}

Session::Session(Config config, const PluginRegistry& registry) : config_(std::move(config)) {
  const auto opts = options_for(config_.model);
  std::int64_t config_pad = 0;
  if (causal()) {
    decoder_ = DecoderModel::load(config_.model.path, opts);
    const auto& dc = decoder_->config();
    config_pad = dc.pad_token_id >= 0 ? dc.pad_token_id : (dc.eos_token_ids.empty() ? 0 : dc.eos_token_ids[0]);
  } else if (seq2seq()) {
    t5_ = T5Model::load(config_.model.path, opts);
    config_pad = t5_->config().pad_token_id;
  } else {
    encoder_ = BertModel::load(config_.model.path, opts);
    config_pad = encoder_->config().pad_token_id;
  }
  // A learned position table ends somewhere: refuse a max_length past it now rather than
  // when a long enough text comes, maybe hours into training.
  const std::int64_t limit = encoder_ ? encoder_->max_tokens() : decoder_ ? decoder_->max_tokens() : 0;
  if (limit > 0 && config_.data.max_length > limit)
    throw std::runtime_error("[data] max_length = " + std::to_string(config_.data.max_length) + " exceeds the " + std::to_string(limit) +
                             " positions of " + config_.model.path);
  for (const auto& n : model().ignored_tensors()) spdlog::debug("checkpoint tensor {} is not used by the model", n);
  tokenizer_ = load_tokenizer(config_.model.path);
  // Padding never reaches a real token's output; its id only has to be in range.
  pad_id_ = tokenizer_->pad_id() >= 0 ? tokenizer_->pad_id() : std::max<std::int64_t>(config_pad, 0);
  data_ = load_dataset(config_.data, token_classification() ? Labels::PerWord : (causal() || seq2seq()) ? Labels::None : Labels::PerExample);
  const auto max_length = static_cast<std::size_t>(config_.data.max_length);
  auto tokenize = [&](const std::vector<Example>& split, std::vector<std::vector<std::int64_t>>& ids, std::vector<std::int64_t>& prompt) {
    // Token classification: the template's specials around the words' pieces, each word's
    // tag on its first piece (-100 elsewhere), truncated like the text.
    std::vector<std::int64_t> before, after;
    if (token_classification()) {
      const auto with = tokenizer_->encode("a"), without = tokenizer_->encode("a", 0, false);
      const auto at = std::search(with.begin(), with.end(), without.begin(), without.end());
      before.assign(with.begin(), at), after.assign(at + static_cast<long>(without.size()), with.end());
    }
    auto& tags = &split == &data_.train ? train_tags_ : test_tags_;
    for (const auto& e : split) {
      if (token_classification()) {
        std::vector<std::int64_t> t = before, tag(before.size(), -100);
        for (std::size_t w = 0; w < e.words.size(); ++w) {
          const auto pieces = tokenizer_->encode(w == 0 ? e.words[w] : " " + e.words[w], 0, false);
          for (std::size_t k = 0; k < pieces.size(); ++k) t.push_back(pieces[k]), tag.push_back(k == 0 ? e.tags[w] : -100);
        }
        const std::size_t body = max_length > after.size() ? max_length - after.size() : 0;
        if (t.size() > body) t.resize(body), tag.resize(body);
        t.insert(t.end(), after.begin(), after.end()), tag.insert(tag.end(), after.size(), -100);
        ids.push_back(std::move(t)), tags.push_back(std::move(tag));
        continue;
      }
      if (!causal()) {
        ids.push_back(tokenizer_->encode(e.text, max_length));
        continue;
      }
      // [BOS] prompt text EOS; the template's special tokens come with the first part.
      std::vector<std::int64_t> p = e.prompt.empty() ? std::vector<std::int64_t>{} : tokenizer_->encode(e.prompt);
      std::vector<std::int64_t> t = tokenizer_->encode(e.text, 0, e.prompt.empty());
      const auto& eos = decoder_->config().eos_token_ids;
      if (!eos.empty()) t.push_back(eos[0]);
      p.insert(p.end(), t.begin(), t.end());
      prompt.push_back(static_cast<std::int64_t>(std::min(p.size() - t.size(), max_length)));
      if (p.size() > max_length) p.resize(max_length);
      ids.push_back(std::move(p));
    }
  };
  tokenize(data_.train, train_ids_, train_prompt_);
  tokenize(data_.test, test_ids_, test_prompt_);
  if (causal()) {
    // Truncation cuts from the end, so a long prompt can leave an example nothing to
    // predict: say how many, and refuse a split where none is left (it trained on 0 tokens
    // and reported a perplexity of 1).
    struct Part { const char* name; const std::vector<std::vector<std::int64_t>>& ids; const std::vector<std::int64_t>& prompt; };
    for (const auto& [split, ids, prompt] : {Part{"training", train_ids_, train_prompt_}, Part{"test", test_ids_, test_prompt_}}) {
      std::size_t empty = 0;
      for (std::size_t i = 0; i < ids.size(); ++i) empty += static_cast<std::size_t>(prompt[i]) >= ids[i].size();
      const std::string what = std::to_string(empty) + " of " + std::to_string(ids.size()) + " " + split + " examples keep no '" +
                               config_.data.text_column + "' token after their prompt at max_length = " + std::to_string(max_length);
      if (empty == ids.size()) throw std::runtime_error(config_.data.path + ": " + what + ": raise max_length or shorten the prompts");
      if (empty > 0) spdlog::warn("{}: {}; they add nothing to the loss", config_.data.path, what);
    }
  }
  if (seq2seq()) {
    for (const auto& e : data_.train) train_target_.push_back(tokenizer_->encode(e.target, max_length));
    for (const auto& e : data_.test) test_target_.push_back(tokenizer_->encode(e.target, max_length));
  }

  at::manual_seed(static_cast<std::uint64_t>(config_.train.seed));
  offer_extensions();
  for (auto& m : config_.methods) {
    auto inst = registry.create(m.plugin, m.name);
    inst->attach(model(), m.targets, m.checked);
    methods_.push_back(std::move(inst));
    plugins_.push_back(*registry.find(m.plugin));
  }
  if (causal() || seq2seq()) return;
  std::int64_t L = config_.task.num_labels ? config_.task.num_labels : static_cast<std::int64_t>(data_.label_names.size());
  if (L < static_cast<std::int64_t>(data_.label_names.size()))
    throw std::runtime_error("task.num_labels = " + std::to_string(L) + " but the data has " + std::to_string(data_.label_names.size()) + " labels");
  // The task head: nn.Linear's default init.
  const double bound = 1.0 / std::sqrt(static_cast<double>(model().info().hidden_size));
  const auto popts = model().info().param_options;
  head_w_ = at::empty({L, model().info().hidden_size}, popts).uniform_(-bound, bound).set_requires_grad(true);
  head_b_ = at::empty({L}, popts).uniform_(-bound, bound).set_requires_grad(true);
}

Session::~Session() {
  for (auto& m : methods_) {
    try {
      m->detach(model());
    } catch (const std::exception& e) {
      spdlog::warn("{}", e.what());
    }
  }
}

Batch Session::batch(Split which, const std::vector<std::size_t>& order, std::size_t begin, std::size_t end) const {
  const auto& split = examples(which);
  const auto& all_ids = token_ids(which);
  std::size_t T = config_.data.padding == "max_length" ? static_cast<std::size_t>(config_.data.max_length) : 0;
  for (std::size_t i = begin; i < end; ++i) T = std::max(T, all_ids[order[i]].size());
  const auto B = static_cast<std::int64_t>(end - begin);
  Batch b;
  b.ids = at::full({B, static_cast<std::int64_t>(T)}, pad_id_, at::kLong);
  b.mask = at::zeros({B, static_cast<std::int64_t>(T)}, at::kLong);
  b.labels = at::empty({B}, at::kLong);
  b.lm_labels = at::full({B, static_cast<std::int64_t>(T)}, -100, at::kLong);
  auto lm_a = b.lm_labels.accessor<std::int64_t, 2>();
  auto ids_a = b.ids.accessor<std::int64_t, 2>();
  auto mask_a = b.mask.accessor<std::int64_t, 2>();
  auto lab_a = b.labels.accessor<std::int64_t, 1>();
  for (std::int64_t r = 0; r < B; ++r) {
    const auto& ids = all_ids[order[begin + static_cast<std::size_t>(r)]];
    for (std::size_t t = 0; t < ids.size(); ++t) {
      ids_a[r][static_cast<std::int64_t>(t)] = ids[t];
      mask_a[r][static_cast<std::int64_t>(t)] = 1;
      if (causal() && static_cast<std::int64_t>(t) >= prompt_lengths(which)[order[begin + static_cast<std::size_t>(r)]])
        lm_a[r][static_cast<std::int64_t>(t)] = ids[t];
      if (token_classification())
        lm_a[r][static_cast<std::int64_t>(t)] = (which == Split::Train ? train_tags_ : test_tags_)[order[begin + static_cast<std::size_t>(r)]][t];
    }
    lab_a[r] = split[order[begin + static_cast<std::size_t>(r)]].label;
    const auto& tags = split[order[begin + static_cast<std::size_t>(r)]].sample_tags;
    for (std::size_t k = 0; k < tags.size(); ++k) b.tags[config_.data.tag_columns[k]].push_back(tags[k]);
  }
  if (seq2seq()) {  // teacher forcing: the decoder reads the target shifted right by one
    const auto& targets = split_targets(which);
    std::size_t U = 0;
    for (std::size_t i = begin; i < end; ++i) U = std::max(U, targets[order[i]].size());
    b.decoder_ids = at::full({B, static_cast<std::int64_t>(U)}, pad_id_, at::kLong);
    b.lm_labels = at::full({B, static_cast<std::int64_t>(U)}, -100, at::kLong);
    auto dec_a = b.decoder_ids.accessor<std::int64_t, 2>();
    auto lab2 = b.lm_labels.accessor<std::int64_t, 2>();
    for (std::int64_t r = 0; r < B; ++r) {
      const auto& t = targets[order[begin + static_cast<std::size_t>(r)]];
      dec_a[r][0] = t5_->config().decoder_start_token_id;
      for (std::size_t u = 0; u < t.size(); ++u) {
        lab2[r][static_cast<std::int64_t>(u)] = t[u];
        if (u + 1 < U) dec_a[r][static_cast<std::int64_t>(u + 1)] = t[u];
      }
    }
  }
  const auto dev = model().info().options.device();
  if (b.decoder_ids.defined()) b.decoder_ids = b.decoder_ids.to(dev);
  b.ids = b.ids.to(dev);
  b.mask = b.mask.to(dev);
  b.labels = b.labels.to(dev);
  b.lm_labels = b.lm_labels.to(dev);
  return b;
}

Tensor Session::logits(const Batch& b) {
  if (!encoder_) throw std::logic_error("logits() is for sequence classification");
  enter(b);
  Encoded e = encoder_->forward(b.ids, b.mask);
  // Pool over the input tokens only: prompt tokens (if any) are the method's, not the text's.
  Tensor h = e.hidden.narrow(1, e.prompt_length, b.ids.size(1));  // (B, T, H)
  if (token_classification()) return at::linear(h.to(head_w_.scalar_type()), head_w_, head_b_);  // (B, T, L)
  Tensor pooled;                                                   // (B, H)
  if (config_.task.pooling == "cls") {
    pooled = h.select(1, 0);
  } else {
    Tensor m = b.mask.unsqueeze(-1).to(h.dtype());  // (B, T, 1)
    pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9);
  }
  return at::linear(pooled.to(head_w_.scalar_type()), head_w_, head_b_);  // (B, L), f32
}

namespace {

// The LM head's input rows that predict a labelled token, and those tokens: (N, H), (N).
// Causal: text position t (prompt tokens a method prepended are dropped) predicts label
// t + 1. Seq2seq: decoder position t predicts label t. Unlabelled positions (padding,
// prompts) never reach the head.
std::pair<Tensor, Tensor> head_rows(DecoderModel* decoder, T5Model* t5, const Batch& b) {
  if (t5) return labelled_rows(t5->head_input(t5->decode(b.decoder_ids, t5->encode(b.ids, b.mask))), b.lm_labels);
  const auto T = b.ids.size(1);
  Tensor h = decoder->forward(b.ids, b.mask);  // (B, P + T, H)
  return labelled_rows(h.narrow(1, h.size(1) - T, T - 1), b.lm_labels.narrow(1, 1, T - 1));
}

}  // namespace

Tensor Session::loss(const Batch& b) {
  if (causal() || seq2seq()) {
    enter(b);
    auto [h, next] = head_rows(decoder_.get(), t5_.get(), b);
    LinearSiteImpl& head = causal() ? decoder_->head() : t5_->head();
    return head_loss_sum(head, h, next) / static_cast<double>(std::max<std::int64_t>(1, next.size(0)));
  }
  return classification_loss(logits(b), b);
}

Tensor Session::classification_loss(const Tensor& logits, const Batch& b) const {
  if (token_classification())  // logits (B, T, L)
    return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}), b.lm_labels.reshape({-1}), {}, at::Reduction::Mean, -100);
  return at::cross_entropy_loss(logits, b.labels);  // (B, L)
}

void Session::offer_extensions() {
  training_ext_ = {{sizeof(tessera_host_training_v1), 1}, this,
                   [](void* host, const char*) { static_cast<Session*>(host)->trainable_changed_ = true; },
                   [](void* host, Tensor* loss, Tensor* logits) {
                     auto& s = *static_cast<Session*>(host);
                     if (s.training_batch_ == nullptr) throw std::runtime_error("forward_again runs only inside extra_loss() of a training step");
                     if (s.causal() || s.seq2seq()) {
                       *loss = s.loss(*s.training_batch_);
                       *logits = Tensor();
                       return;
                     }
                     *logits = s.logits(*s.training_batch_);
                     *loss = s.classification_loss(*logits, *s.training_batch_);
                   }};
  tokenizer_ext_ = {{sizeof(tessera_host_tokenizer_v1), 1}, this,
                    [](void* host, const std::string& text) { return static_cast<Session*>(host)->tokenizer_->encode(text, 0, false); }};
  model().set_extension(TESSERA_EXT_HOST_TRAINING, &training_ext_);
  model().set_extension(TESSERA_EXT_HOST_TOKENIZER, &tokenizer_ext_);
}

TokenStats Session::token_stats(const Batch& b) {
  TokenStats st;
  if (causal() || seq2seq()) {
    enter(b);
    auto [h, next] = head_rows(decoder_.get(), t5_.get(), b);
    const HeadStats s = head_stats(causal() ? decoder_->head() : t5_->head(), h, next);
    st.loss_sum = s.loss_sum, st.correct = s.correct, st.tokens = next.size(0);
    return st;
  }
  Tensor logits = this->logits(b), next = b.lm_labels;  // (B, T, L), (B, T)
  Tensor keep = next.ne(-100);
  st.loss_sum = at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}), next.reshape({-1}), {}, at::Reduction::Sum, -100).item<double>();
  st.tokens = keep.sum().item<std::int64_t>();
  st.correct = logits.argmax(-1).eq(next).logical_and(keep).sum().item<std::int64_t>();
  return st;
}

std::vector<std::string> Session::generate_text(Split split, const std::vector<std::size_t>& order, std::size_t begin, std::size_t end) {
  std::vector<std::vector<std::int64_t>> sources;
  Batch tagged;  // the examples' tags, for methods that route by them
  for (std::size_t i = begin; i < end; ++i) {
    sources.push_back(token_ids(split)[order[i]]);
    const auto& tags = examples(split)[order[i]].sample_tags;
    for (std::size_t k = 0; k < tags.size(); ++k) tagged.tags[config_.data.tag_columns[k]].push_back(tags[k]);
  }
  enter(tagged);
  GenerateOptions o;
  o.max_new_tokens = config_.data.max_length;
  o.eos_token_ids = {t5_->config().eos_token_id};
  o.pad_token_id = t5_->config().pad_token_id;
  std::vector<std::string> out;
  for (const auto& ids : generate(*t5_, sources, o)) out.push_back(tokenizer_->decode(ids));
  return out;
}

std::int64_t Session::base_parameter_count() {
  std::int64_t n = 0;
  for (auto* p : model().parameter_sites()) n += p->base().numel();
  return n;
}

std::int64_t Session::trainable_parameter_count() {
  std::int64_t n = 0;
  for (const auto& [_, t] : head()) n += t.numel();
  for (auto& m : methods_)
    for (const auto& [_, t] : m->call("trainable", [](Method& x) { return x.trainable(); })) n += t.numel();
  return n;
}

void Session::save_adapter(const std::string& dir) {
  // Written whole beside `dir`, then swapped in: the previous epoch's adapter survives a
  // failed save, and no method folder of an earlier layout lingers.
  replace_folder(dir, [&](const std::string& out) {
    nlohmann::json manifest = {{"format", "tessera-adapter"}, {"version", 1}, {"labels", data_.label_names},
                               {"pooling", config_.task.pooling}, {"architecture", model().info().architecture},
                               {"task", config_.task.kind}};
    manifest["methods"] = nlohmann::json::array();
    for (std::size_t i = 0; i < methods_.size(); ++i) {
      auto& m = methods_[i];
      const auto& mc = config_.methods[i];
      fs::path sub = fs::path(out) / mc.name;
      fs::create_directories(sub);
      auto tensors = m->call("state", [](Method& x) { return x.state(); });
      save_safetensors((sub / "adapter_model.safetensors").string(), tensors, {{"format", "pt"}});
      write_file_atomic((sub / "adapter_config.json").string(), m->call("adapter_config_json", [](Method& x) { return x.adapter_config_json(); }) + "\n");
      // Where the plugin came from: `tessera eval` names it when it is not found again.
      manifest["methods"].push_back({{"plugin", mc.plugin}, {"name", mc.name}, {"targets", mc.targets}, {"dir", mc.name},
                                     {"plugin_version", plugins_[i].version}, {"plugin_file", plugins_[i].path}});
    }
    if (!head().empty()) save_safetensors((fs::path(out) / "head.safetensors").string(), head(), {{"format", "pt"}});
    write_file_atomic((fs::path(out) / "tessera.json").string(), manifest.dump(2) + "\n");
  });
}

void Session::check_manifest(const std::string& dir) {
  // tessera.json says what the adapter was trained for. Loading it into another setup would
  // not always fail on a shape: a label set of the same size in another order reads the
  // head's rows as other classes.
  const std::string path = (fs::path(dir) / "tessera.json").string();
  if (!fs::exists(path)) throw std::runtime_error(path + ": missing (an adapter folder written by `tessera train` has one)");
  const nlohmann::json j = read_json_file(path);
  const JsonFields f(j, path);
  auto quoted = [](const std::string& x) { return "\"" + x + "\""; };
  if (f.string_or("format", "") != "tessera-adapter") f.fail("format", "must be \"tessera-adapter\"");
  auto same = [&](const char* key, const std::string& now, const char* what) {
    const std::string was = f.string_or(key, now);
    if (was != now) f.fail(key, "is " + quoted(was) + ", but " + what + " is " + quoted(now));
  };
  same("task", config_.task.kind, "the run's task");
  same("architecture", model().info().architecture, "the model's architecture");
  auto list = [](const std::vector<std::string>& v) {
    std::string out;
    for (const auto& x : v) out += (out.empty() ? "" : ", ") + x;
    return "[" + out + "]";
  };
  try {
    const auto labels = j.value("labels", std::vector<std::string>{});
    if (labels != data_.label_names)
      f.fail("labels", "are " + list(labels) + ", but the data now gives " + list(data_.label_names) + ": the head would read them as other classes");
    std::vector<std::string> was, now;
    if (f.has("methods")) {
      const auto& methods = j.at("methods");  // by reference: errors then name their place, "(/methods/0/name)"
      if (!methods.is_array()) f.fail("methods", "must be a list, got " + methods.dump());
      for (const auto& m : methods) was.push_back(m.at("name").get<std::string>() + " (" + m.at("plugin").get<std::string>() + ")");
    }
    for (const auto& m : config_.methods) now.push_back(m.name + " (" + m.plugin + ")");
    if (was != now) f.fail("methods", "are " + list(was) + ", but the run's config has " + list(now));
  } catch (...) {
    rethrow_naming(path);
  }
}

void Session::load_adapter(const std::string& dir) {
  auto read_all = [](const std::string& path) {
    auto file = SafetensorsFile::open(path);
    NamedTensors out;
    for (const auto& n : file->names()) out[n] = file->tensor(n);
    return out;
  };
  check_manifest(dir);
  at::NoGradGuard no_grad;
  for (std::size_t i = 0; i < methods_.size(); ++i) {
    fs::path file = fs::path(dir) / config_.methods[i].name / "adapter_model.safetensors";
    auto tensors = read_all(file.string());
    methods_[i]->call("load_state", [&](Method& x) { x.load_state(tensors); });
  }
  if (!head_w_.defined()) return;  // causal-lm and seq2seq train no head
  auto head = read_all((fs::path(dir) / "head.safetensors").string());
  for (auto pair : std::initializer_list<std::pair<const char*, Tensor*>>{{"classifier.weight", &head_w_}, {"classifier.bias", &head_b_}}) {
    auto it = head.find(pair.first);
    if (it == head.end()) throw SafetensorsError(dir + "/head.safetensors", pair.first, "missing");
    if (it->second.sizes() != pair.second->sizes())
      throw SafetensorsError(dir + "/head.safetensors", pair.first, "has shape " + c10::str(it->second.sizes()) + ", the task needs " + c10::str(pair.second->sizes()));
    pair.second->copy_(it->second);
  }
}

}  // namespace tessera
