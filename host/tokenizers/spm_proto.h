// The parts of a SentencePiece `.model` file (a serialized ModelProto, sentencepiece_model.proto)
// that a tokenizer.json pipeline is built from: the pieces with their scores and types, and
// the normalizer's precompiled charsmap (the tokenizer class, not the file, decides
// between Unigram and BPE, as in transformers). libsentencepiece reads the same file
// but its public header exposes neither the charsmap nor the piece types as a whole, and
// Debian ships no generated protobuf header for it, so the few fields are read here from
// the protobuf wire format (varints, length-delimited fields, fixed 32/64-bit values).
#pragma once

#include <string>
#include <vector>

namespace tessera {

struct SpmProto {
  // SentencePiece.Type: what the piece is to the model.
  enum Type { normal = 1, unknown = 2, control = 3, user_defined = 4, unused = 5, byte = 6 };
  struct Piece {
    std::string text;
    float score = 0;
    Type type = normal;
  };
  std::vector<Piece> pieces;  // in id order
  std::string precompiled_charsmap;  // raw bytes; empty when the normalizer has none
};

// dir/tokenizer.model, else dir/spiece.model; "" when neither exists.
std::string find_spm_model(const std::string& dir);

// Throws "FILE: not a SentencePiece model (reason)" for a file that does not parse as one.
SpmProto read_spm_proto(const std::string& file);

}  // namespace tessera
