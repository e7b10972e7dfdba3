#include "assess/svg_chart.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace tessera {
namespace {

constexpr double kWidth = 660, kHeight = 380, kLeft = 64, kRight = 170, kTop = 34, kBottom = 50;

// Twelve colours that stay apart from one another (and from the grey of the axes).
const char* colour(std::size_t i) {
  static const char* c[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79", "#ad494a"};
  return c[i % 12];
}
// After twelve series the colours come back dashed.
std::string dash(std::size_t i) { return i < 12 ? "" : i < 24 ? " stroke-dasharray=\"6 3\"" : " stroke-dasharray=\"2 2\""; }

struct Axis {
  double lo = 0, hi = 1;
  bool log = false;
  double map(double v, double a, double b) const {  // value -> pixel between a and b
    const double t = log ? (std::log10(v) - lo) / (hi - lo) : (v - lo) / (hi - lo);
    return a + t * (b - a);
  }
  // Round tick values: 1, 2 or 5 × 10^k steps; powers of ten on a log axis.
  std::vector<double> ticks() const {
    std::vector<double> t;
    if (log) {
      for (double e = std::ceil(lo); e <= hi + 1e-9; ++e) t.push_back(std::pow(10.0, e));
      return t;
    }
    const double raw = (hi - lo) / 5, mag = std::pow(10.0, std::floor(std::log10(raw)));
    const double step = raw / mag < 1.5 ? mag : raw / mag < 3.5 ? 2 * mag : raw / mag < 7.5 ? 5 * mag : 10 * mag;
    for (double v = std::ceil(lo / step) * step; v <= hi + 1e-9 * step; v += step) t.push_back(std::abs(v) < 1e-12 * step ? 0.0 : v);
    return t;
  }
};

Axis axis_of(const std::vector<Series>& s, bool x, bool log) {
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (const auto& e : s)
    for (const auto& p : e.points) {
      const double v = x ? p.first : p.second;
      if (!std::isfinite(v) || (log && v <= 0)) continue;
      lo = std::min(lo, log ? std::log10(v) : v), hi = std::max(hi, log ? std::log10(v) : v);
    }
  if (!std::isfinite(lo)) lo = 0, hi = 1;
  if (log) return {std::floor(lo), std::max(std::ceil(hi), std::floor(lo) + 1), true};
  const double pad = hi > lo ? 0.05 * (hi - lo) : std::max(1e-9, std::abs(hi) * 0.05 + 1e-9);
  return {lo - pad, hi + pad, false};
}

std::string tick_label(double v) { return fmt::format("{:.4g}", v); }

std::string frame(const ChartSpec& spec, const Axis& ax, const Axis& ay) {
  const double x0 = kLeft, x1 = kWidth - kRight, y0 = kHeight - kBottom, y1 = kTop;
  std::string o = fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"#fff\" stroke=\"#999\"/>", x0, y1, x1 - x0, y0 - y1);
  for (double t : ax.ticks()) {
    const double x = ax.map(t, x0, x1);
    o += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\" stroke=\"#eee\"/><text x=\"{0:.1f}\" y=\"{3}\" text-anchor=\"middle\">{4}</text>", x, y0, y1,
                     y0 + 16, tick_label(t));
  }
  for (double t : ay.ticks()) {
    const double y = ay.map(t, y0, y1);
    o += fmt::format("<line x1=\"{0}\" y1=\"{1:.1f}\" x2=\"{2}\" y2=\"{1:.1f}\" stroke=\"#eee\"/><text x=\"{3}\" y=\"{4:.1f}\" text-anchor=\"end\">{5}</text>", x0, y, x1,
                     x0 - 6, y + 4, tick_label(t));
  }
  o += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-weight=\"bold\">{}</text>", (x0 + x1) / 2, 20, escape_xml(spec.title));
  o += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>", (x0 + x1) / 2, kHeight - 12, escape_xml(spec.x_label));
  o += fmt::format("<text transform=\"translate(16 {}) rotate(-90)\" text-anchor=\"middle\">{}</text>", (y0 + y1) / 2, escape_xml(spec.y_label));
  return o;
}

}  // namespace

std::string escape_xml(const std::string& s) {
  std::string o;
  for (char c : s) o += c == '&' ? "&amp;" : c == '<' ? "&lt;" : c == '>' ? "&gt;" : c == '"' ? "&quot;" : std::string(1, c);
  return o;
}

std::string svg_chart(const ChartSpec& spec, const std::vector<Series>& series) {
  const Axis ax = axis_of(series, true, spec.log_x), ay = axis_of(series, false, false);
  const double x0 = kLeft, x1 = kWidth - kRight, y0 = kHeight - kBottom, y1 = kTop;
  // Taller than the plot when the legend needs it (a row of 14 px per series).
  const double height = std::max(kHeight, kTop + 14.0 * static_cast<double>(series.size()) + 12);
  std::string o = fmt::format("<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {} {}\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">", kWidth,
                              height, kWidth, height);
  o += frame(spec, ax, ay);
  for (std::size_t i = 0; i < series.size(); ++i) {
    const auto& s = series[i];
    std::string pts;
    for (const auto& [x, y] : s.points) {
      if (!std::isfinite(x) || !std::isfinite(y) || (spec.log_x && x <= 0)) continue;
      const double px = ax.map(x, x0, x1), py = ay.map(y, y0, y1);
      if (spec.lines) pts += fmt::format("{:.1f},{:.1f} ", px, py);
      else
        o += fmt::format("<circle cx=\"{0:.1f}\" cy=\"{1:.1f}\" r=\"4\" fill=\"{2}\"/><text x=\"{3:.1f}\" y=\"{4:.1f}\" fill=\"{2}\">{5}</text>", px, py, colour(i), px + 6,
                         py - 5, escape_xml(s.name));
    }
    if (spec.lines && !pts.empty())
      o += fmt::format("<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"{} points=\"{}\"/>", colour(i), dash(i), pts);
    const double ly = y1 + 14.0 * static_cast<double>(i) + 6;  // the legend, right of the plot
    o += fmt::format("<line x1=\"{0}\" y1=\"{1:.1f}\" x2=\"{2}\" y2=\"{1:.1f}\" stroke=\"{3}\" stroke-width=\"3\"{4}/><text x=\"{5}\" y=\"{6:.1f}\">{7}</text>", x1 + 12, ly,
                     x1 + 30, colour(i), dash(i), x1 + 36, ly + 4, escape_xml(s.name));
  }
  return o + "</svg>";
}

}  // namespace tessera
