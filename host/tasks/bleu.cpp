#include "tasks/bleu.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <cmath>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>

namespace tessera {
namespace {

// One of 13a's rewrite rules: every match of `pattern` replaced by `replacement`, as
// Python's re.sub does (left to right, non-overlapping).
class Rule {
 public:
  Rule(const char* pattern, const char* replacement) : replacement_(replacement) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern), PCRE2_ZERO_TERMINATED, PCRE2_UTF, &error, &offset, nullptr);
    if (!code_) throw std::logic_error(std::string("13a rule does not compile: ") + pattern);
  }
  ~Rule() { pcre2_code_free(code_); }
  std::string apply(const std::string& s) const {
    std::string out(s.size() * 3 + 16, '\0');
    PCRE2_SIZE n = out.size();
    int rc = pcre2_substitute(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), 0, PCRE2_SUBSTITUTE_GLOBAL, nullptr, nullptr,
                              reinterpret_cast<PCRE2_SPTR>(replacement_.c_str()), replacement_.size(),
                              reinterpret_cast<PCRE2_UCHAR*>(out.data()), &n);
    if (rc < 0) return s;  // invalid UTF-8: left as it came
    out.resize(n);
    return out;
  }

 private:
  pcre2_code* code_ = nullptr;
  std::string replacement_;
};

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (std::size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) s.replace(at, from.size(), to);
  return s;
}

std::vector<std::string> words(const std::string& s) {
  std::istringstream in(s);
  std::vector<std::string> out;
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

}  // namespace

std::string tokenize_13a(const std::string& input) {
  static const Rule rules[] = {
      {R"(([\{-\~\[-\` -\&\(-\+\:-\@\/]))", " $1 "},  // symbols
      {R"(([^0-9])([\.,]))", "$1 $2 "},               // period and comma unless preceded by a digit
      {R"(([\.,])([^0-9]))", " $1 $2"},               // … unless followed by a digit
      {R"(([0-9])(-))", "$1 $2 "},                    // dash after a digit
  };
  std::string line = replace_all(input, "<skipped>", "");
  line = replace_all(line, "-\n", "");
  line = replace_all(line, "\n", " ");
  for (auto [entity, ch] : {std::pair{"&quot;", "\""}, {"&amp;", "&"}, {"&lt;", "<"}, {"&gt;", ">"}}) line = replace_all(line, entity, ch);
  line = " " + line + " ";
  for (const auto& r : rules) line = r.apply(line);
  std::string out;
  for (const auto& w : words(line)) out += (out.empty() ? "" : " ") + w;
  return out;
}

BleuScore corpus_bleu(const std::vector<std::string>& hypotheses, const std::vector<std::string>& references) {
  if (hypotheses.size() != references.size()) throw std::invalid_argument("BLEU: as many references as hypotheses are needed");
  std::array<double, 4> correct{}, total{};
  BleuScore b;
  for (std::size_t i = 0; i < hypotheses.size(); ++i) {
    // sacrebleu strips trailing whitespace before tokenizing.
    auto rstrip = [](std::string s) { return s.erase(s.find_last_not_of(" \t\n\r\f\v") + 1); };
    const auto hyp = words(tokenize_13a(rstrip(hypotheses[i]))), ref = words(tokenize_13a(rstrip(references[i])));
    b.hypothesis_length += hyp.size();
    b.reference_length += ref.size();
    for (std::size_t n = 1; n <= 4; ++n) {
      std::map<std::vector<std::string>, int> ref_counts;
      for (std::size_t k = 0; k + n <= ref.size(); ++k) ++ref_counts[{ref.begin() + static_cast<long>(k), ref.begin() + static_cast<long>(k + n)}];
      std::map<std::vector<std::string>, int> hyp_counts;
      for (std::size_t k = 0; k + n <= hyp.size(); ++k) ++hyp_counts[{hyp.begin() + static_cast<long>(k), hyp.begin() + static_cast<long>(k + n)}];
      for (const auto& [gram, count] : hyp_counts) {
        auto it = ref_counts.find(gram);
        correct[n - 1] += std::min(count, it == ref_counts.end() ? 0 : it->second);
        total[n - 1] += count;
      }
    }
  }
  const double sys = static_cast<double>(b.hypothesis_length), ref = static_cast<double>(b.reference_length);
  b.brevity_penalty = sys < ref ? (sys > 0 ? std::exp(1 - ref / sys) : 0.0) : 1.0;
  if (correct[0] + correct[1] + correct[2] + correct[3] == 0) return b;
  double smooth = 1, log_sum = 0;
  for (std::size_t n = 0; n < 4; ++n) {
    if (total[n] == 0) break;
    if (correct[n] == 0) {
      smooth *= 2;
      b.precisions[n] = 100.0 / (smooth * total[n]);
    } else {
      b.precisions[n] = 100.0 * correct[n] / total[n];
    }
  }
  for (double p : b.precisions) log_sum += p == 0 ? -9999999999.0 : std::log(p);
  b.score = b.brevity_penalty * std::exp(log_sum / 4);
  return b;
}

}  // namespace tessera
