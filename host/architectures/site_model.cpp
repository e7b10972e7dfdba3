#include "architectures/site_model.h"

#include <tessera/extensions.h>

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

namespace tessera {

Unpadded Unpadded::of(const Tensor& mask) { return {mask.reshape({-1}).to(at::kBool).nonzero().squeeze(1), mask.size(0), mask.size(1)}; }

Tensor Unpadded::rows(const Tensor& x) const {
  auto shape = x.sizes().vec();
  shape.erase(shape.begin());
  shape[0] = batch * seq;
  return x.reshape(shape).index_select(0, index);
}

Tensor Unpadded::padded(const Tensor& x) const {
  auto shape = x.sizes().vec();  // (N, …)
  shape[0] = batch * seq;
  Tensor out = at::zeros(shape, x.options()).index_copy(0, index, x);
  shape[0] = seq;
  shape.insert(shape.begin(), batch);
  return out.view(shape);
}

namespace {

void write_log(std::int32_t level, const char* instance, const char* message) {
  const auto lvl = level <= TESSERA_LOG_DEBUG ? spdlog::level::debug : level == TESSERA_LOG_INFO ? spdlog::level::info : spdlog::level::warn;
  try {
    spdlog::log(lvl, "{}: {}", instance ? instance : "?", message ? message : "");
  } catch (...) {  // a C entry point: nothing escapes into the plugin
  }
}

const tessera_host_log_v1 kLog{{sizeof(tessera_host_log_v1), 1}, &write_log};

}  // namespace

SiteModel::SiteModel() { set_extension(TESSERA_EXT_HOST_LOG, &kLog); }

void SiteModel::enter_forward(const Tensor& mask, const Unpadded* u) const {
  set_attention_mask(mask);
  set_token_rows(u ? u->index : Tensor(), u ? u->seq : 0);
}

bool SiteModel::token_wise_only() const {
  for (const auto& s : sublayers_)
    if (!s->token_wise()) return false;
  for (const auto& l : layer_sites_)
    if (!l->empty()) return false;
  for (const auto& a : attentions_)  // an input prefix reads (B, T, H)
    if (a->input_prefix_length() > 0) return false;
  return true;
}

void SiteModel::describe(ModelInfo shape, c10::TensorOptions options) {
  info_ = std::move(shape);
  info_.options = options.requires_grad(false);
  info_.param_options = options.dtype(at::kFloat).requires_grad(false);
}

void SiteModel::drop_dense_copies() {
  for (auto* p : parameter_sites()) ParameterSiteImpl::of(*p).drop_dense_copy();
}

}  // namespace tessera
