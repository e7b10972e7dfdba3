// report.md and report.html from the aggregated rows (assess/report.cpp).
#include "assess/report.h"
#include "assess/svg_chart.h"

#include "train/progress.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <vector>

namespace tessera {
namespace {

using json = nlohmann::json;

bool has(const json& row, const char* k) { return row.contains(k) && row[k].is_number(); }
double num(const json& row, const char* k) { return row[k].get<double>(); }

// A table cell's text: a '|' would end the cell.
std::string cell(const std::string& s) {
  std::string o;
  for (char c : s) o += c == '|' ? std::string("\\|") : std::string(1, c);
  return o;
}

// A metric's mean over n runs, ± their sample standard deviation where n > 1; an accuracy in percent.
std::string mean_sd_text(double mean, double sd, std::size_t n, bool percent) {
  const double k = percent ? 100 : 1;
  const std::string v = percent ? fmt::format("{:.2f}", k * mean) : fmt::format("{:.4g}", mean);
  const std::string s = n < 2 ? "" : percent ? fmt::format(" ± {:.2f}", k * sd) : fmt::format(" ± {:.3g}", sd);
  return v + s + (percent ? "%" : "");
}

std::string metric_text(const json& row) {
  return mean_sd_text(num(row, "metric_mean"), num(row, "metric_spread"), row["runs"].get<std::size_t>() - row["failed"].get<std::size_t>(),
                      row["metric"] == "accuracy");
}

std::string count_text(double n) {
  std::string d = fmt::format("{:.0f}", n), o;
  for (std::size_t i = 0; i < d.size(); ++i) o += ((i > 0 && (d.size() - i) % 3 == 0) ? "," : "") + std::string(1, d[i]);
  return o;
}

std::string bytes_text(double b) { return b >= 1e6 ? fmt::format("{:.1f} MB", b / 1e6) : fmt::format("{:.1f} kB", b / 1e3); }

// The table's columns: a header, and the cell's text and raw value for a row.
struct Column {
  const char* header;
  const char* key;  // the row's field the cell shows (its data-value); "" for text
  std::string (*text)(const json&);
};

const std::vector<Column>& columns() {
  static const std::vector<Column> c = {
      {"metric (mean ± sd)", "metric_mean", metric_text},
      {"trainable", "trainable", [](const json& r) { return count_text(num(r, "trainable")); }},
      {"share", "trainable_share", [](const json& r) { return fmt::format("{:.3g}%", 100 * num(r, "trainable_share")); }},
      {"peak RSS", "peak_rss_mib", [](const json& r) { return fmt::format("{:.0f} MiB", num(r, "peak_rss_mib")); }},
      {"train ex/s", "train_examples_per_s", [](const json& r) { return fmt::format("{:.1f}", num(r, "train_examples_per_s")); }},
      {"train tok/s", "train_tokens_per_s", [](const json& r) { return fmt::format("{:.0f}", num(r, "train_tokens_per_s")); }},
      {"eval ex/s", "eval_examples_per_s", [](const json& r) { return fmt::format("{:.1f}", num(r, "eval_examples_per_s")); }},
      {"eval ex/s merged", "eval_merged_examples_per_s",
       [](const json& r) { return has(r, "eval_merged_examples_per_s") ? fmt::format("{:.1f}", num(r, "eval_merged_examples_per_s")) : std::string("—"); }},
      {"adapter", "adapter_bytes", [](const json& r) { return bytes_text(num(r, "adapter_bytes")); }},
      {"wall", "wall_seconds", [](const json& r) { return format_duration(num(r, "wall_seconds")); }},
      {"FLOP/s of peak", "flops_share", [](const json& r) { return has(r, "flops_share") ? fmt::format("{:.1f}%", 100 * num(r, "flops_share")) : std::string("—"); }},
  };
  return c;
}

std::string status_text(const json& row) {
  const std::string merge = row.contains("merge_error") ? " (no merge: " + row["merge_error"].get<std::string>() + ")" : "";
  if (row["failed"].get<int>() == 0) return "ok" + merge;
  std::string s = fmt::format("{} of {} failed:", row["failed"].get<int>(), row["runs"].get<int>());
  for (const auto& e : row["errors"]) s += " " + e.get<std::string>() + (e == row["errors"].back() ? "" : ";");
  return s;
}

std::string machine_text(const json& m) {
  return fmt::format("{} ({} threads), torch {}, Tessera {}; dense f32 product peak {:.1f} GFLOP/s measured in this run; {}", m.value("cpu", "?"), m.value("threads", 0),
                     m.value("torch", "?"), m.value("tessera", "?"), m.value("peak_flops", 0.0) / 1e9, m.value("date", ""));
}

// Footnotes every report carries: what the columns count.
const char* kNotes =
    "Peak RSS: the training process's own high-water mark (VmHWM). Training examples/s and tokens/s: the optimizer steps after the first three. "
    "Evaluation: the test split through `tessera eval` unmerged and after `--merge` (— where a method cannot be folded into the weights). "
    "FLOP/s of peak: the base's linear products per training token, 4·N_matmul (forward and input gradients; 2·N_matmul where no "
    "gradient enters the backbone: the head alone, LST; 6·N_matmul when the base's weights train), times tokens/s, over this machine's "
    "dense f32 product measured at the start; the methods' own products and attention's T² products are left out (a lower bound).";

// The training loss of each setup's first finished run, smoothed as the progress bar shows it.
std::vector<Series> loss_series(const json& records) {
  std::vector<Series> out;
  std::vector<std::string> seen;
  for (const auto& r : records) {
    const std::string s = r["setup"].get<std::string>();
    if (!r["ok"].get<bool>() || std::find(seen.begin(), seen.end(), s) != seen.end()) continue;
    seen.push_back(s);
    Series e{s, {}};
    double avg = 0;
    for (const auto& p : r["loss_curve"]) {
      const double l = p[1].get<double>();
      avg = e.points.empty() ? l : 0.9 * avg + 0.1 * l;
      e.points.emplace_back(p[0].get<double>(), avg);
    }
    out.push_back(std::move(e));
  }
  return out;
}

// The review's trade-off plots: the task metric against `x` (trainable share, peak memory).
std::vector<Series> against(const json& rows, const char* x, double scale) {
  std::vector<Series> out;
  for (const auto& row : rows)
    if (has(row, "metric_mean") && has(row, x))
      out.push_back({row["setup"].get<std::string>(), {{scale * num(row, x), num(row, "metric_mean") * (row["metric"] == "accuracy" ? 100 : 1)}}});
  return out;
}

std::string report_charts(const json& rows, const json& records) {
  std::string metric = "metric";
  for (const auto& row : rows)
    if (row.contains("metric")) metric = row["metric"].get<std::string>() == "accuracy" ? "test accuracy (%)" : "test " + row["metric"].get<std::string>();
  std::string o = svg_chart({"Training loss (moving average)", "optimizer step", "loss", true, false}, loss_series(records));
  o += svg_chart({"Task metric against trainable share", "trainable parameters (% of the base, log scale)", metric, false, true}, against(rows, "trainable_share", 100));
  o += svg_chart({"Task metric against peak memory", "peak RSS of training (MiB)", metric, false, false}, against(rows, "peak_rss_mib", 1));
  return o;
}

// Each setup as a share of full fine-tuning's cost, where the matrix has a `full` row.
std::string full_table(const json& rows) {
  std::string o;
  for (const auto& row : rows) {
    if (!row.contains("vs_full")) continue;
    const json& v = row["vs_full"];
    auto cell = [&](const char* k) { return v.contains(k) ? fmt::format("<td data-key=\"{}\" data-value=\"{:.17g}\">{:.3g}×</td>", k, v[k].get<double>(), v[k].get<double>()) : std::string("<td>—</td>"); };
    o += "<tr><td class=\"name\">" + escape_xml(row["setup"].get<std::string>()) + "</td>" + cell("trainable") + cell("peak_rss_mib") + cell("train_examples_per_s") + cell("adapter_bytes") + "</tr>";
  }
  if (o.empty()) return o;
  return "<h2>As a share of full fine-tuning</h2><table id=\"vs-full\"><thead><tr><th>setup</th><th>trainable</th><th>peak RSS</th><th>train ex/s</th><th>adapter</th></tr></thead><tbody>" +
         o + "</tbody></table>";
}

// Each setup beside the peer library that has its method (bench/assess_peers.py), where the
// report has peers: the metric, training examples/s and peak RSS of both, and the ratios.
struct PeerCell {
  std::string text;
  double value;
  const char* key;
};

// The peer's mean over the seeds it ran (bench/assess_peers.py runs every seed ours finished),
// ± their sample standard deviation as metric_text gives ours, and how many seeds' peers failed.
std::string peer_metric_text(const json& p, double mean, bool percent) {
  const auto values = p.value("metric_values", json::array());
  const auto failed = p.value("failed_seeds", json::array());
  return mean_sd_text(mean, p.value("metric_spread", 0.0), values.size(), percent) +
         (failed.empty() ? "" : fmt::format(" ({} of {} seeds failed)", failed.size(), failed.size() + values.size()));
}

std::vector<PeerCell> peer_cells(const json& row) {
  const json& p = row["peer"];
  const bool percent = row.value("metric", "") == "accuracy";
  const double ours_speed = num(row, "train_examples_per_s"), peer_speed = p["examples_per_s"].get<double>();
  const double ours_rss = num(row, "peak_rss_mib"), peer_rss = p["peak_rss_mib"].get<double>();
  // The peer's value of the row's own metric (accuracy, or a decoder's perplexity).
  const double theirs = p.value("test_" + row.value("metric", std::string("accuracy")), std::nan(""));
  return {{metric_text(row), num(row, "metric_mean"), "metric_mean"},
          {std::isnan(theirs) ? std::string("—") : peer_metric_text(p, theirs, percent), theirs, "peer_metric"},
          {fmt::format("{:.1f}", ours_speed), ours_speed, "train_examples_per_s"},
          {fmt::format("{:.1f}", peer_speed), peer_speed, "peer_examples_per_s"},
          {fmt::format("{:.2f}×", ours_speed / peer_speed), ours_speed / peer_speed, "speed_ratio"},
          {fmt::format("{:.0f} MiB", ours_rss), ours_rss, "peak_rss_mib"},
          {fmt::format("{:.0f} MiB", peer_rss), peer_rss, "peer_peak_rss_mib"},
          {fmt::format("{:.2f}×", ours_rss / peer_rss), ours_rss / peer_rss, "rss_ratio"}};
}

bool has_peer(const json& row) { return row.contains("peer") && !row["peer"].contains("error") && has(row, "metric_mean"); }

const char* kPeerHeaders[] = {"setup", "peer", "metric", "peer's metric", "train ex/s", "peer's ex/s", "speed", "peak RSS", "peer's peak RSS", "memory"};

std::string peers_markdown(const json& rows) {
  std::string body;
  for (const auto& row : rows) {
    if (!row.contains("peer")) continue;
    body += "| " + cell(row["setup"].get<std::string>()) + " | ";
    if (!has_peer(row)) {
      body += "— | " + cell(row["peer"].value("error", std::string("no finished run"))) + " |||||||\n";
      continue;
    }
    body += row["peer"]["peer"].get<std::string>() + " (" + row["peer"]["method"].get<std::string>() + ") |";
    for (const auto& c : peer_cells(row)) body += " " + c.text + " |";
    body += "\n";
  }
  if (body.empty()) return body;
  std::string head = "\n## Against the peer libraries\n\n|";
  for (const char* h : kPeerHeaders) head += std::string(" ") + h + " |";
  head += "\n|";
  for (std::size_t i = 0; i < std::size(kPeerHeaders); ++i) head += "---|";
  return head + "\n" + body;
}

std::string peers_html(const json& rows) {
  std::string body;
  for (const auto& row : rows) {
    if (!row.contains("peer")) continue;
    body += "<tr data-setup=\"" + escape_xml(row["setup"].get<std::string>()) + "\"><td class=\"name\">" + escape_xml(row["setup"].get<std::string>()) + "</td>";
    if (!has_peer(row)) {
      body += "<td class=\"status\" colspan=\"9\">" + escape_xml(row["peer"].value("error", std::string("no finished run"))) + "</td></tr>";
      continue;
    }
    body += "<td class=\"name\">" + escape_xml(row["peer"]["peer"].get<std::string>() + " (" + row["peer"]["method"].get<std::string>() + ")") + "</td>";
    for (const auto& c : peer_cells(row)) body += fmt::format("<td data-key=\"{}\" data-value=\"{:.17g}\">{}</td>", c.key, c.value, escape_xml(c.text));
    body += "</tr>";
  }
  if (body.empty()) return body;
  std::string head = "<h2>Against the peer libraries</h2><p class=\"note\">The same data, split, batch, length, epochs, rates, seeds and threads "
                     "through transformers with peft or AdapterHub's adapters on the same torch (bench/assess_peers.py), each side's metric "
                     "the mean ± sd over the seeds; speed and memory: ours over the peer's.</p>"
                     "<table id=\"peers\"><thead><tr>";
  for (const char* h : kPeerHeaders) head += std::string("<th>") + escape_xml(h) + "</th>";
  return head + "</tr></thead><tbody>" + body + "</tbody></table>";
}

}  // namespace

std::string report_markdown(const json& rows, const json& machine) {
  std::string o = "# Tessera assessment\n\n" + machine_text(machine) + "\n\n| setup |";
  for (const auto& c : columns()) o += std::string(" ") + c.header + " |";
  o += " status |\n|---|";
  for (std::size_t i = 0; i <= columns().size(); ++i) o += "---|";
  o += "\n";
  for (const auto& row : rows) {
    o += "| " + cell(row["setup"].get<std::string>()) + " |";
    for (const auto& c : columns()) o += " " + (has(row, c.key) ? c.text(row) : std::string("—")) + " |";
    o += " " + cell(status_text(row)) + " |\n";
  }
  return o + "\n" + kNotes + "\n" + peers_markdown(rows);
}

std::string report_html(const json& rows, const json& records, const json& machine) {
  std::string o = "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Tessera assessment</title><style>"
                  "body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;font-size:13px}"
                  "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}th{background:#f4f4f4}"
                  "td.name,td.status,th:first-child,th:last-child{text-align:left}td.status{white-space:normal;min-width:240px}"
                  "td.failed{color:#b00}.charts{display:flex;flex-wrap:wrap;gap:16px}p.note{font-size:12px;color:#555;max-width:1100px}"
                  "</style></head><body><h1>Tessera assessment</h1>";
  o += "<p>" + escape_xml(machine_text(machine)) + "</p><table id=\"assessment\"><thead><tr><th>setup</th>";
  for (const auto& c : columns()) o += std::string("<th>") + escape_xml(c.header) + "</th>";
  o += "<th>status</th></tr></thead><tbody>";
  for (const auto& row : rows) {
    o += "<tr data-setup=\"" + escape_xml(row["setup"].get<std::string>()) + "\"><td class=\"name\">" + escape_xml(row["setup"].get<std::string>()) + "</td>";
    for (const auto& c : columns())
      o += has(row, c.key) ? fmt::format("<td data-key=\"{}\" data-value=\"{:.17g}\">{}</td>", c.key, num(row, c.key), escape_xml(c.text(row))) : "<td>—</td>";
    // A run that cannot merge is fine: said briefly, the reason on hover (the Markdown has it whole).
    const bool short_merge = row["failed"].get<int>() == 0 && row.contains("merge_error");
    o += std::string("<td class=\"status") + (row["failed"].get<int>() ? " failed" : "") + "\"" +
         (short_merge ? " title=\"" + escape_xml(row["merge_error"].get<std::string>()) + "\">ok, not mergeable" : ">" + escape_xml(status_text(row))) + "</td></tr>";
  }
  o += "</tbody></table><p class=\"note\">" + escape_xml(kNotes) + "</p>" + full_table(rows) + peers_html(rows) + "<div class=\"charts\">";
  o += report_charts(rows, records);
  return o + "</div></body></html>\n";
}

}  // namespace tessera
