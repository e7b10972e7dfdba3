#include "support.h"

#include "train/dataset.h"

#include <fstream>

using namespace tessera;

namespace {
std::string write(const std::filesystem::path& dir, const std::string& name, const std::string& body) {
  auto p = (dir / name).string();
  std::ofstream(p, std::ios::binary) << body;
  return p;
}
}  // namespace

CATCH_TEST_CASE("CSV: quotes, doubled quotes, embedded newlines and commas, CRLF, BOM", "[train][data]") {
  auto dir = test::temp_dir("csv");
  auto rows = read_csv(write(dir, "a.csv", "\xEF\xBB\xBFtext,label\r\n\"a, \"\"quoted\"\"\nline\",1\r\nplain,0\n"));
  CATCH_REQUIRE(rows.size() == 3);
  CATCH_CHECK(rows[0] == std::vector<std::string>{"text", "label"});
  CATCH_CHECK(rows[1][0] == "a, \"quoted\"\nline");
  CATCH_CHECK(rows[2] == std::vector<std::string>{"plain", "0"});
  CATCH_CHECK_THROWS_WITH(read_csv(write(dir, "b.csv", "text,label\n\"never closed,1\n")), Catch::Contains("b.csv:2: quoted field never closed"));
}

CATCH_TEST_CASE("datasets from CSV and JSONL: labels, seeded split, errors with line numbers", "[train][data]") {
  auto dir = test::temp_dir("ds");
  std::string csv = "label,text\n";
  std::string jsonl;
  for (int i = 0; i < 10; ++i) {
    csv += std::to_string(i % 2 ? 10 : 2) + ",sentence " + std::to_string(i) + "\n";
    jsonl += "{\"text\": \"sentence " + std::to_string(i) + "\", \"label\": \"" + (i % 2 ? "pos" : "neg") + "\"}\n";
  }
  DataConfig c;
  c.path = write(dir, "d.csv", csv);
  c.test_fraction = 0.3;
  Dataset d = load_dataset(c);
  CATCH_CHECK(d.label_names == std::vector<std::string>{"2", "10"});  // numeric labels sort as numbers
  CATCH_CHECK(d.test.size() == 3);
  CATCH_CHECK(d.train.size() == 7);
  Dataset again = load_dataset(c);
  for (std::size_t i = 0; i < d.test.size(); ++i) CATCH_CHECK(d.test[i].text == again.test[i].text);  // seeded

  c.path = write(dir, "d.jsonl", jsonl);
  Dataset j = load_dataset(c);
  CATCH_CHECK(j.label_names == std::vector<std::string>{"neg", "pos"});
  CATCH_CHECK(j.train.size() + j.test.size() == 10);

  c.path = write(dir, "bad.jsonl", "{\"text\": \"a\", \"label\": 1}\n{\"txt\": \"b\", \"label\": 0}\n");
  CATCH_CHECK_THROWS_WITH(load_dataset(c), Catch::Contains("bad.jsonl:2: needs a string 'text'"));
  c.path = write(dir, "bad.csv", "text,label\na,1\nb\n");
  CATCH_CHECK_THROWS_WITH(load_dataset(c), Catch::Contains("record 3 has 1 fields"));
  c.path = write(dir, "nocol.csv", "sentence,label\na,1\n");
  CATCH_CHECK_THROWS_WITH(load_dataset(c), Catch::Contains("no column 'text'"));
  // One class is nothing to learn (it trained to a loss of 0 and "accuracy 1").
  c.path = write(dir, "one.csv", "text,label\na,1\nb,1\nc,1\n");
  CATCH_CHECK_THROWS_WITH(load_dataset(c), Catch::EndsWith("one.csv: column 'label' holds a single label ('1'): a classifier needs at least two"));
  // Integer labels too long for 64 bits sort as text instead of failing in the conversion.
  c.path = write(dir, "long.csv", "text,label\na,123456789012345678901\nb,2\nc,2\n");
  CATCH_CHECK(load_dataset(c).label_names == std::vector<std::string>{"123456789012345678901", "2"});
  // A header that swaps the two columns' names: the sentences became labels, one class each.
  std::string swapped = "label,text\n", unique = "text,label\n";
  for (int i = 0; i < 12; ++i) {
    swapped += "a sentence about film number " + std::to_string(i) + "," + std::to_string(i % 2) + "\n";
    unique += "a sentence about film number " + std::to_string(i) + ",class" + std::to_string(i) + "\n";
  }
  c.path = write(dir, "swapped.csv", swapped);
  CATCH_CHECK_THROWS_WITH(load_dataset(c), Catch::EndsWith("swapped.csv: column 'label' holds 12 distinct labels in 12 examples, longer than the texts of column "
                                                          "'text' (30 against 1 characters on average): are the two columns swapped? ([data] text_column, label_column)"));
  // As many short labels as texts is odd, not wrong (a warning): it loads.
  c.path = write(dir, "unique.csv", unique);
  CATCH_CHECK(load_dataset(c).label_names.size() == 12);
}

CATCH_TEST_CASE("tag columns: each example carries its values, from CSV and JSON lines, and a missing one is named", "[train][data]") {
  auto dir = test::temp_dir("tags");
  std::string csv = "text,label,task\n", jsonl;
  for (int i = 0; i < 6; ++i) {
    csv += "sentence " + std::to_string(i) + "," + std::to_string(i % 2) + "," + (i < 3 ? "a" : "b") + "\n";
    jsonl += "{\"text\": \"sentence " + std::to_string(i) + "\", \"label\": " + std::to_string(i % 2) + ", \"task\": " + (i < 3 ? "\"a\"" : "7") + "}\n";
  }
  DataConfig c;
  c.tag_columns = {"task"};
  for (const auto& [file, second] : {std::pair<std::string, std::string>{write(dir, "t.csv", csv), "b"}, {write(dir, "t.jsonl", jsonl), "7"}}) {
    c.path = file;
    Dataset d = load_dataset(c);
    std::size_t seen_second = 0;
    for (const auto* split : {&d.train, &d.test})
      for (const auto& e : *split) {
        CATCH_REQUIRE(e.sample_tags.size() == 1);
        const bool first_half = e.text < "sentence 3";
        CATCH_CHECK(e.sample_tags[0] == (first_half ? "a" : second));
        seen_second += !first_half;
      }
    CATCH_CHECK(seen_second == 3);
  }
  c.path = write(dir, "u.jsonl", "{\"text\": \"x\", \"label\": 0}\n");
  CATCH_CHECK_THROWS_WITH(load_dataset(c), Catch::Contains("u.jsonl:1: needs a value 'task' (a [data] tag_columns entry)"));
  c.path = write(dir, "u.csv", "text,label\nx,0\ny,1\n");
  CATCH_CHECK_THROWS_WITH(load_dataset(c), Catch::Contains("no column 'task' in the header"));
}
