// `tessera sites MODEL [PATTERN]`: every site of a model, the names a method's targets match.
#pragma once

#include <ostream>
#include <string>

namespace tessera {

// Loads the Hugging Face directory `model_dir` (BERT/RoBERTa, a decoder or T5) and writes one
// line per site whose canonical name or Hugging Face path matches `pattern` (the targets'
// syntax; empty: every site): kind, canonical name, Hugging Face path, shape, and the
// interventions the site accepts. Returns how many sites were written.
std::size_t print_sites(const std::string& model_dir, const std::string& pattern, std::ostream& out);

}  // namespace tessera
