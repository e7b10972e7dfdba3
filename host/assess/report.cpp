#include "assess/report.h"

#include "train/progress.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <sstream>
#include <vector>

namespace tessera {
namespace {

using json = nlohmann::json;

double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0.0 : s / static_cast<double>(v.size());
}

// The sample standard deviation (n − 1); 0 for one value.
double spread(const std::vector<double>& v) {
  if (v.size() < 2) return 0.0;
  const double m = mean(v);
  double s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / static_cast<double>(v.size() - 1));
}

// Numbers of the finished runs of one setup, by field.
struct Values {
  std::map<std::string, std::vector<double>> by;
  void add(const std::string& k, const json& v) {
    if (v.is_number()) by[k].push_back(v.get<double>());
  }
  json mean_of(const std::string& k) const { return by.count(k) ? json(mean(by.at(k))) : json(); }
};

// Model FLOPs of one training token in the base's linear products: the forward (2 per
// weight) and the input gradients back through them (2 more) — none where no gradient enters
// the backbone (the head alone; LST, whose side network reads the backbone's states); the
// weights' own gradients (2 more) when they train, 6N for full fine-tuning as utilisation
// figures count it. What the methods add (small low-rank or bottleneck products) and
// attention's T² products are left out: a lower bound of the work done.
double flops_per_token(double matmul, const json& plugins) {
  auto uses = [&](const char* p) { return std::find(plugins.begin(), plugins.end(), p) != plugins.end(); };
  const bool no_backward = plugins.empty() || (plugins.size() == 1 && uses("lst"));
  return (no_backward ? 2.0 : uses("full") ? 6.0 : 4.0) * matmul;
}

json row_of(const std::string& setup, const std::vector<const json*>& runs, double peak) {
  json row = {{"setup", setup}, {"runs", runs.size()}, {"failed", 0}, {"errors", json::array()}};
  Values v;
  for (const json* r : runs) {
    if (!(*r)["ok"].get<bool>()) {
      row["failed"] = row["failed"].get<int>() + 1;
      const std::string why = (*r).value("error", std::string("failed"));
      auto& errors = row["errors"];
      if (std::find(errors.begin(), errors.end(), why) == errors.end()) errors.push_back(why);  // once, when every seed failed alike
      continue;
    }
    const json& res = (*r)["result"];
    const std::string metric = res.value("metric", std::string("accuracy"));
    row["metric"] = metric;
    v.add("metric", res["test_" + metric]);
    for (const char* k : {"trainable_parameters", "base_parameters", "examples_per_s", "tokens_per_s", "matmul_parameters"}) v.add(k, res[k]);
    v.add("peak_rss_mib", (*r)["peak_rss_mib"]);
    v.add("wall_seconds", (*r)["wall_seconds"]);
    v.add("adapter_bytes", (*r)["adapter_bytes"]);
    v.add("eval_examples_per_s", (*r)["eval"]["examples_per_s"]);
    if (r->contains("eval_merged")) v.add("eval_merged_examples_per_s", (*r)["eval_merged"]["examples_per_s"]);
    else if (r->contains("merge_error")) row["merge_error"] = (*r)["merge_error"];
    if (r->contains("plugins")) row["plugins"] = (*r)["plugins"];
  }
  if (!v.by.count("metric")) return row;
  row["metric_values"] = v.by["metric"];
  row["metric_mean"] = mean(v.by["metric"]);
  row["metric_spread"] = spread(v.by["metric"]);
  row["trainable"] = v.mean_of("trainable_parameters"), row["base"] = v.mean_of("base_parameters");
  row["trainable_share"] = row["trainable"].get<double>() / std::max(1.0, row["base"].get<double>());
  row["peak_rss_mib"] = v.mean_of("peak_rss_mib"), row["wall_seconds"] = v.mean_of("wall_seconds"), row["adapter_bytes"] = v.mean_of("adapter_bytes");
  row["train_examples_per_s"] = v.mean_of("examples_per_s"), row["train_tokens_per_s"] = v.mean_of("tokens_per_s");
  row["eval_examples_per_s"] = v.mean_of("eval_examples_per_s"), row["eval_merged_examples_per_s"] = v.mean_of("eval_merged_examples_per_s");
  const double flops = row["train_tokens_per_s"].get<double>() * flops_per_token(v.mean_of("matmul_parameters").get<double>(), row.value("plugins", json::array()));
  row["train_flops_per_s"] = flops;
  row["flops_share"] = peak > 0 ? json(flops / peak) : json();
  return row;
}

// A setup that is full fine-tuning alone: what every other row is read against.
bool is_full(const json& row) { return row.contains("plugins") && row["plugins"] == json::array({"full"}) && row.contains("metric_mean"); }

}  // namespace

bool lower_is_better(const std::string& metric) { return metric == "perplexity" || metric == "loss"; }

json aggregate(const json& records, const json& machine, const json& peers) {
  std::vector<std::string> order;
  std::map<std::string, std::vector<const json*>> runs;
  for (const auto& r : records) {
    const std::string s = r["setup"].get<std::string>();
    if (!runs.count(s)) order.push_back(s);
    runs[s].push_back(&r);
  }
  json rows = json::array();
  for (const auto& s : order) {
    rows.push_back(row_of(s, runs[s], machine.value("peak_flops", 0.0)));
    if (peers.is_object() && peers.contains(s)) rows.back()["peer"] = peers[s];
  }
  const auto full = std::find_if(rows.begin(), rows.end(), is_full);
  if (full != rows.end()) {
    const json f = *full;
    for (auto& row : rows) {
      if (!row.contains("metric_mean")) continue;
      json vs;
      for (const char* k : {"trainable", "peak_rss_mib", "train_examples_per_s", "adapter_bytes"})
        if (row[k].is_number() && f[k].is_number() && f[k].get<double>() > 0) vs[k] = row[k].get<double>() / f[k].get<double>();
      row["vs_full"] = vs;
    }
  }
  return rows;
}

}  // namespace tessera
