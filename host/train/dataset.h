// Labelled text from CSV (RFC 4180, header row) or JSON lines, and a seeded train/test
// split that is the same on every machine (our own shuffle, not the library's).
#pragma once

#include "runtime/config.h"

#include <cstdint>
#include <string>
#include <vector>

namespace tessera {

struct Example {
  std::string text;
  std::int64_t label = 0;  // index into Dataset::label_names
  std::string prompt;      // causal-lm with a prompt column: the part the loss leaves out
  std::string target;      // seq2seq: what the decoder learns to write (text is the source)
  std::vector<std::string> words;  // token-classification: the words (text is them joined by spaces)
  std::vector<std::int64_t> tags;  // … and one label index per word
  std::vector<std::string> sample_tags;  // one value per [data] tag_columns entry, in its order
};

struct Dataset {
  std::vector<std::string> label_names;  // numeric labels sorted numerically, others by text
  std::vector<Example> train, test;
};

// Throws std::runtime_error naming file and line for malformed input. Unlabelled data
// (causal-lm, seq2seq) reads no label column and has no label names. Word-labelled data
// (token-classification) is JSON lines whose text and label columns are arrays of equal
// length: words and their tags; the tags make the label names.
enum class Labels { PerExample, None, PerWord };
Dataset load_dataset(const DataConfig& config, Labels labels = Labels::PerExample);

// Fisher–Yates with a SplitMix64 stream: identical on every platform and library.
void seeded_shuffle(std::vector<std::size_t>& v, std::uint64_t seed);

// Rows of a CSV file as strings, the header first.
std::vector<std::vector<std::string>> read_csv(const std::string& path);

}  // namespace tessera
