"""Turn the Pang & Lee sentence-polarity file shipped by Debian's python3-pattern into
`text,label` CSV (label 1 = positive, 0 = negative). The source is headerless
`"polarity","sentence"` rows with polarity 1 / -1 and a UTF-8 byte-order mark."""
import csv
import sys

src, dst = sys.argv[1], sys.argv[2]
rows = []
with open(src, newline="", encoding="utf-8-sig") as f:
    for rec in csv.reader(f):
        if len(rec) != 2:
            continue
        polarity, text = rec[0].strip(), " ".join(rec[1].split())
        if polarity not in ("1", "-1") or not text:
            continue
        rows.append((text, 1 if polarity == "1" else 0))
if len(rows) != 4000:
    sys.exit(f"expected 4000 sentences in {src}, found {len(rows)}")
with open(dst, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["text", "label"])
    w.writerows(rows)
