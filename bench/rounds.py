"""Medians of bench/train_rounds.sh's runs: for each config WORK/<name>.toml, the training
examples/s of every round, their median, and the median peak RSS.

    rounds(work, n) -> {name: {"eps": [...], "median_eps": float, "rss": float}}"""
import json
import pathlib
import statistics


def rounds(work, n):
    w = pathlib.Path(work)
    last = lambda p: json.loads([l for l in p.read_text().splitlines() if l.startswith("{")][-1])
    out = {}
    for cfg in sorted(w.glob("*.toml")):
        name = cfg.stem
        eps = [json.loads((w / f"{name}-{i}" / "result.json").read_text())["examples_per_s"] for i in range(1, n + 1)]
        rss = statistics.median(last(w / f"{name}-{i}.err")["peak_rss_mib"] for i in range(1, n + 1))
        out[name] = {"eps": eps, "median_eps": statistics.median(eps), "rss": rss}
    return out
