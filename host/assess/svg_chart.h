// A chart as inline SVG for a self-contained HTML page: axes with round ticks (a log axis
// at powers of ten), series as lines or labelled points, a legend. No script, no fonts or
// styles from anywhere.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace tessera {

struct Series {
  std::string name;
  std::vector<std::pair<double, double>> points;  // (x, y)
};

struct ChartSpec {
  std::string title, x_label, y_label;
  bool lines = true;   // false: points, each labelled with its series' name
  bool log_x = false;  // x > 0 only
};

std::string svg_chart(const ChartSpec& spec, const std::vector<Series>& series);

// HTML/XML text escaped (&, <, >, ").
std::string escape_xml(const std::string& s);

}  // namespace tessera
