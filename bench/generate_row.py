"""One result line of a generation benchmark: the peer's and Tessera's new tokens/s and peak
RSS (measure.py's JSON lines in WORK/peer.json, peer.err, ours.json, ours.err) and how many
leading new tokens of the first row both chose alike.
usage: generate_row.py WORK NAME"""
import json
import pathlib
import sys

w, name = pathlib.Path(sys.argv[1]), sys.argv[2]
last = lambda p: json.loads([l for l in p.read_text().splitlines() if l.startswith("{")][-1])
p, o = last(w / "peer.json"), last(w / "ours.json")
peer, ours = p["new_tokens_per_s"], o["new_tokens_per_s"]
prss, orss = last(w / "peer.err")["peak_rss_mib"], last(w / "ours.err")["peak_rss_mib"]
equal = next((i for i, (a, b) in enumerate(zip(p["first_row"], o["first_row"])) if a != b), min(len(p["first_row"]), len(o["first_row"])))
print(f"{name:28} {peer:14.1f} {ours:14.1f} {ours / peer:7.2f}x {prss:12.0f} {orss:12.0f} {orss / prss:8.2f} {equal:4}/{len(p['first_row'])}")
