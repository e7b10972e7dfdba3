"""Reads back an assessment (tests/cli/assess.sh): report.html's table, parsed as HTML, holds
for each finished setup the mean of the test metric and the trainable parameters that its
runs wrote into their own result.json, the merged column only where the method folds, and a
status naming the failure of a setup that could not run; report.md has one row per setup;
the SVG charts are inline and nothing is fetched from elsewhere. With `peers`: the peers
table holds peers.json's accuracy — the mean ± sd of a peer run for each of our seeds — and
ratios computed from the cells beside them.

usage: assess_check.py OUT [peers]"""
import json
import os
import statistics
import sys
from html.parser import HTMLParser

out = sys.argv[1]


class Table(HTMLParser):
    def __init__(self, table_id="assessment"):
        super().__init__()
        self.table_id = table_id
        self.rows, self.row, self.in_table, self.cell, self.text = {}, None, False, None, ""
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "link", "img", "iframe") or "src" in a or ("href" in a and not a["href"].startswith("#")):
            self.srcs.append((tag, a))
        if tag == "table" and a.get("id") == self.table_id:
            self.in_table = True
        if self.in_table and tag == "tr" and "data-setup" in a:
            self.row = self.rows.setdefault(a["data-setup"], {})
        if self.row is not None and tag == "td":
            self.cell, self.text = a, ""

    def handle_data(self, data):
        if self.cell is not None:
            self.text += data

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            if "data-key" in self.cell:
                self.row[self.cell["data-key"]] = float(self.cell["data-value"])
                self.row[self.cell["data-key"] + "_text"] = self.text
            elif "status" in self.cell.get("class", ""):
                self.row["status"] = self.text
            self.cell = None
        if tag == "table":
            self.in_table, self.row = False, None


html = open(os.path.join(out, "report.html")).read()
if len(sys.argv) > 2 and sys.argv[2] == "peers":  # the peers table: peft's numbers beside ours, read back
    t = Table("peers")
    t.feed(html)
    peers = json.load(open(os.path.join(out, "peers.json")))
    row = t.rows["lora"]
    assert 0 <= row["peer_metric"] <= 1 and abs(row["peer_metric"] - peers["lora"]["test_accuracy"]) < 1e-12, row
    assert row["peer_examples_per_s"] > 0 and row["peer_peak_rss_mib"] > 50, row
    assert abs(row["speed_ratio"] - row["train_examples_per_s"] / row["peer_examples_per_s"]) < 1e-9, row
    # Every seed ours finished has its peer run, and each side's cell is the mean ± sd over them.
    lora = peers["lora"]
    accs = [r["test_accuracy"] for r in lora["runs"]]
    assert sorted(r["seed"] for r in lora["runs"]) == [3, 4] and lora["seeds"] == [3, 4] and not lora["failed_seeds"], lora
    assert abs(lora["test_accuracy"] - statistics.mean(accs)) < 1e-12 and abs(lora["metric_spread"] - statistics.stdev(accs)) < 1e-12, lora
    assert row["peer_metric_text"] == f"{100 * statistics.mean(accs):.2f} ± {100 * statistics.stdev(accs):.2f}%", row
    assert " ± " in row["metric_mean_text"], row
    assert "no peer library has bitfit" in t.rows["bitfit"]["status"], t.rows["bitfit"]
    assert len(peers["bitfit"]["runs"]) == 1, peers["bitfit"]  # a refusal holds for every seed: said once
    ran = json.load(open(os.path.join(out, "results.json")))["runs"]  # each setup's own seeds, else the matrix's
    assert sorted((r["setup"], r["seed"]) for r in ran) == [("bitfit", 3), ("bitfit", 4), ("lora", 3), ("lora", 4), ("mam", 3)], ran
    assert peers["mam"]["seeds"] == [3], peers["mam"]
    mam = t.rows["mam"]  # a composition group that is AdapterHub's MAMConfig runs as that preset
    assert peers["mam"]["peer"] == "transformers+adapters" and abs(mam["peer_metric"] - peers["mam"]["test_accuracy"]) < 1e-12, mam
    print(f"assess_check: peers table read back (ours {row['train_examples_per_s']:.1f} ex/s, peft {row['peer_examples_per_s']:.1f};"
          f" MAM {mam['metric_mean']:.4f} against AdapterHub's {mam['peer_metric']:.4f})")
    sys.exit(0)
if len(sys.argv) > 2 and sys.argv[2] == "lm-peers":  # the decoder's peers: perplexity, on our own batches
    t = Table("peers")
    t.feed(html)
    peers = json.load(open(os.path.join(out, "peers.json")))
    row = t.rows["ia3"]
    assert abs(row["peer_metric"] - peers["ia3"]["test_perplexity"]) < 1e-9 * row["peer_metric"], row
    # The same batches, rates and schedule: (IA)³ draws nothing at random, so both sides train
    # the same vectors; only float sums in another order part them.
    assert abs(row["peer_metric"] / row["metric_mean"] - 1) < 1e-4, f"(IA)³ perplexity: ours {row['metric_mean']}, peft's {row['peer_metric']}"
    assert "no peer library has dylora" in t.rows["dylora"]["status"], t.rows["dylora"]
    print(f"assess_check: decoder peers read back ((IA)³ perplexity ours {row['metric_mean']:.4f}, peft's {row['peer_metric']:.4f})")
    sys.exit(0)
t = Table()
t.feed(html)
assert not t.srcs, f"report.html fetches or runs something: {t.srcs}"
assert html.count("<svg") == 3, "three inline charts"
assert set(t.rows) == {"lora", "full", "prompt", "broken", "twice", "diverging"}, t.rows.keys()
assert "training diverged" in t.rows["diverging"]["status"] and "metric_mean" not in t.rows["diverging"]
for setup in ("lora", "full", "prompt"):
    runs = [json.load(open(os.path.join(out, setup, f"seed-{s}", "result.json"))) for s in (1, 2)]
    row = t.rows[setup]
    acc = [r["test_accuracy"] for r in runs]
    assert abs(row["metric_mean"] - statistics.mean(acc)) < 1e-12, (setup, row["metric_mean"], acc)
    assert abs(row["trainable"] - runs[0]["trainable_parameters"]) < 0.5, setup
    assert row["peak_rss_mib"] > 50 and row["train_examples_per_s"] > 0 and row["eval_examples_per_s"] > 0, row
    assert row["adapter_bytes"] > 0 and row["status"].startswith("ok"), row
    assert ("eval_merged_examples_per_s" in row) == (setup != "prompt"), (setup, row)
assert t.rows["full"]["trainable"] > 22_000_000, "full fine-tuning trains every parameter of MiniLM"
assert "not mergeable" in t.rows["prompt"]["status"], t.rows["prompt"]["status"]
assert "lorra" in t.rows["broken"]["status"] and "metric_mean" not in t.rows["broken"]
md = open(os.path.join(out, "report.md")).read()
assert sum(1 for line in md.splitlines() if line.startswith("| ") and not line.startswith("| setup")) == 6, md
print("assess_check: report.html's table equals the runs' own results")
