// Corpus BLEU (Papineni et al. 2002) as sacreBLEU reports it by default: mteval-v13a
// tokenization, n-grams up to 4 clipped by one reference, brevity penalty, and the "exp"
// smoothing of mteval for orders without a match. Written here (about 80 lines, PCRE2
// for the tokenizer's rules) rather than bound to Python's sacrebleu; a test checks it
// against sacrebleu.
#pragma once

#include <array>
#include <string>
#include <vector>

namespace tessera {

struct BleuScore {
  double score = 0;                       // 0 … 100
  std::array<double, 4> precisions{};     // per order, percent (smoothed)
  double brevity_penalty = 0;
  std::size_t hypothesis_length = 0, reference_length = 0;
};

// The 13a tokenization of one line (tokens separated by single spaces).
std::string tokenize_13a(const std::string& line);
BleuScore corpus_bleu(const std::vector<std::string>& hypotheses, const std::vector<std::string>& references);

}  // namespace tessera
