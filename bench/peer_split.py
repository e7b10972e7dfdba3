"""Tessera's seeded train/test split, for the peers: both sides then train on the same rows
in the same order."""
import csv


def seeded_shuffle(v, seed):
    """Fisher-Yates over SplitMix64, as Tessera's dataset shuffles."""
    mask = (1 << 64) - 1
    s = seed
    for i in range(len(v), 1, -1):
        s = (s + 0x9E3779B97F4A7C15) & mask
        z = s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        j = z % i
        v[i - 1], v[j] = v[j], v[i - 1]


def split_rows(path, test_fraction=0.2, seed=13, limit=0):
    """The CSV rows of the train and the test split ([data] test_fraction, seed and limit): a
    limit keeps a seeded sample in file order; the test split is the first share of the
    shuffled order."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if 0 < limit < len(rows):
        keep = list(range(len(rows)))
        seeded_shuffle(keep, seed ^ 0x5EED)
        rows = [rows[k] for k in sorted(keep[:limit])]
    order = list(range(len(rows)))
    seeded_shuffle(order, seed)
    cut = max(1, int(len(rows) * test_fraction + 0.5))  # as the dataset: at least one test row
    return [rows[k] for k in order[cut:]], [rows[k] for k in order[:cut]]


def train_rows(path, test_fraction=0.2, seed=13):
    """The CSV rows of the train split ([data] test_fraction and seed)."""
    return split_rows(path, test_fraction, seed)[0]
