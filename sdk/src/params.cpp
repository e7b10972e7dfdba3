#include <tessera/params.h>

#include <cmath>
#include <sstream>

namespace tessera {

const char* to_string(ParamType t) {
  switch (t) {
    case ParamType::Bool: return "bool";
    case ParamType::Int: return "int";
    case ParamType::Float: return "float";
    case ParamType::String: return "string";
    case ParamType::StringList: return "string list";
    case ParamType::NumberTable: return "table of numbers";
  }
  return "?";
}

ParamType type_of(const ParamValue& v) { return static_cast<ParamType>(v.index()); }

std::string format_value(const ParamValue& v) {
  std::ostringstream out;
  struct Visitor {
    std::ostringstream& o;
    void operator()(bool b) const { o << (b ? "true" : "false"); }
    void operator()(std::int64_t i) const { o << i; }
    void operator()(double d) const { o << d; }
    void operator()(const std::string& s) const { o << '"' << s << '"'; }
    void operator()(const std::vector<std::string>& l) const {
      o << '[';
      for (std::size_t i = 0; i < l.size(); ++i) o << (i ? ", " : "") << '"' << l[i] << '"';
      o << ']';
    }
    void operator()(const NumberTable& t) const {
      o << '{';
      bool first = true;
      for (const auto& [k, x] : t) { o << (first ? " " : ", ") << '"' << k << "\" = " << x; first = false; }
      o << (first ? "}" : " }");
    }
  };
  std::visit(Visitor{out}, v);
  return out.str();
}

double Params::number(const std::string& key) const {
  auto it = values_.find(key);
  if (it == values_.end()) throw ParamError(key, "missing parameter '" + key + "'");
  if (auto* i = std::get_if<std::int64_t>(&it->second)) return static_cast<double>(*i);
  if (auto* d = std::get_if<double>(&it->second)) return *d;
  throw ParamError(key, "parameter '" + key + "' is not a number");
}

namespace {
std::string with_article(const std::string& noun) { return (noun.find_first_of("aeiou") == 0 ? "an " : "a ") + noun; }
}  // namespace

Params apply_schema(const std::vector<ParamSpec>& schema, std::map<std::string, ParamValue> given) {
  std::map<std::string, ParamValue> out;
  for (const auto& spec : schema) {
    auto it = given.find(spec.name);
    ParamValue v = it == given.end() ? spec.default_value : std::move(it->second);
    // An integer written where a float is expected is what the user meant.
    if (spec.type == ParamType::Float && type_of(v) == ParamType::Int)
      v = static_cast<double>(std::get<std::int64_t>(v));
    if (type_of(v) != spec.type)
      throw ParamError(spec.name, "'" + spec.name + "' must be " + with_article(to_string(spec.type)) + ", not " + with_article(to_string(type_of(v))));
    if (spec.type == ParamType::Int || spec.type == ParamType::Float) {
      double x = spec.type == ParamType::Int ? static_cast<double>(std::get<std::int64_t>(v)) : std::get<double>(v);
      if (!std::isfinite(x) || (spec.min && x < *spec.min) || (spec.max && x > *spec.max)) {
        std::ostringstream msg;
        msg << "'" << spec.name << "' = " << format_value(v) << " is outside [";
        if (spec.min) msg << *spec.min; else msg << "-inf";
        msg << ", ";
        if (spec.max) msg << *spec.max; else msg << "inf";
        msg << "]";
        throw ParamError(spec.name, msg.str());
      }
    }
    if (spec.type == ParamType::String && !spec.choices.empty()) {
      const auto& s = std::get<std::string>(v);
      bool ok = false;
      std::string allowed;
      for (const auto& c : spec.choices) { ok |= c == s; allowed += (allowed.empty() ? "" : ", ") + c; }
      if (!ok) throw ParamError(spec.name, "'" + spec.name + "' = \"" + s + "\" is not one of: " + allowed);
    }
    out[spec.name] = std::move(v);
  }
  return Params(std::move(out));
}

}  // namespace tessera
