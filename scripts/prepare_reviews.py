"""Turn the Pang & Lee movie-review polarity file shipped by Debian's python3-pattern (1,500
whole reviews as Debian ships them, one sentence per line) into an unlabelled `text` CSV of their sentences: the
in-domain unlabelled text for adaptation phases (CoDA's). Their polarity labels are dropped:
nothing here is trained on them. The source is headerless `"polarity","review"` rows, the
review's sentences separated by newlines, with a UTF-8 byte-order mark."""
import csv
import sys

src, dst = sys.argv[1], sys.argv[2]
sentences = []
reviews = 0
with open(src, newline="", encoding="utf-8-sig") as f:
    for rec in csv.reader(f):
        if len(rec) != 2:
            continue
        reviews += 1
        for line in rec[1].split("\n"):
            text = " ".join(line.split())
            if len(text.split()) >= 4:  # not a heading or a stray token
                sentences.append(text)
if reviews != 1500:
    sys.exit(f"expected 1500 reviews in {src}, found {reviews}")
with open(dst, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["text"])
    w.writerows([s] for s in sentences)
print(f"{len(sentences)} sentences of {reviews} reviews")
