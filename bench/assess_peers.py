"""The peer libraries' side of an assessment: `tessera assess --peers` runs this after its own
runs (or run it by hand: python bench/assess_peers.py OUT, then `tessera assess MATRIX` again
to re-render). For each setup in OUT/results.json whose method a peer library has — peft, or
AdapterHub's adapters in its own venv, or transformers alone for full fine-tuning — the same task through bench/peer_hf_peft.py with the
run's own data, split, limit, batch, length, epochs, rates, seed and threads (read from the
run's resolved config), measured as Tessera's runs are: the child's peak RSS (ru_maxrss), its
training examples/s, its test accuracy. Writes OUT/peers.json, one entry per setup (an
"error" where no peer applies or the peer failed); a setup already there is not run again.

The peer runner covers sequence classification on an encoder; composition groups, and the
methods no peer library has, are listed with that reason."""
import json
import os
import pathlib
import subprocess
import sys
import time
import tomllib

here = pathlib.Path(__file__).resolve().parent
out = pathlib.Path(sys.argv[1])
results = json.loads((out / "results.json").read_text())
peers_file = out / "peers.json"
peers = json.loads(peers_file.read_text()) if peers_file.exists() else {}
venv = os.environ.get("TESSERA_VENV", "")
adapters_venv = os.environ.get("TESSERA_ADAPTERS_VENV", "")


def peer_method(cfg):
    """(peer_hf_peft.py --method, extra args) for a resolved config, or a reason why none."""
    if cfg["task"]["kind"] != "sequence-classification":
        return None, "the peer runner covers sequence classification"
    if cfg.get("groups"):
        return None, "composition groups: no peer runner"
    methods = cfg.get("methods", [])
    if len(methods) != 1:
        return None, "no methods (the head alone)" if not methods else "several methods: no peer runner"
    m = methods[0]
    plugin, p = m["plugin"], m.get("params", {})
    extra = []
    if cfg["model"].get("quantize", "none") == "nf4":
        extra += ["--quantize", "nf4"]
    elif cfg["model"].get("quantize", "none") != "none":
        return None, f"quantize = {cfg['model']['quantize']}: no peer"
    if plugin == "lora":
        name = "dora" if p.get("use_dora") else "lora_fa" if p.get("lora_fa") else "lora"
        return (name, extra + ["--rank", str(p.get("r", 8))]), None
    if plugin in ("adalora", "loha", "lokr", "vera"):
        return (plugin, extra + (["--rank", str(p["r"])] if plugin in ("loha", "lokr") else [])), None
    if plugin in ("ia3", "prompt_tuning", "p_tuning", "prefix_tuning", "ln_tuning"):
        return (plugin, extra), None
    if plugin == "full" and p.get("embeddings", True) and not m.get("targets"):
        return ("full", extra), None
    if plugin in ("bottleneck", "compacter"):
        return (p.get("config", "seq_bn"), extra), None
    return None, f"no peer library has {plugin}"


def run_peer(setup, record):
    cfg = tomllib.loads(pathlib.Path(record["dir"] + ".toml").read_text())
    what, why = peer_method(cfg)
    if what is None:
        return {"error": why}
    method, extra = what
    adapterhub = method.endswith("_bn") or method.startswith("compacter")
    py = pathlib.Path(adapters_venv if adapterhub else venv) / "bin" / "python"
    t, d = cfg["train"], cfg["data"]
    threads = t["threads"] or os.cpu_count()
    argv = [str(py), str(here / "peer_hf_peft.py"), "--model", cfg["model"]["path"], "--data", d["path"], "--method", method,
            "--epochs", str(t["epochs"]), "--batch-size", str(t["batch_size"]), "--max-length", str(d["max_length"]),
            "--threads", str(threads), "--lr", str(t["lr"]), "--head-lr", str(t["head_lr"]), "--weight-decay", str(t["weight_decay"]),
            "--warmup-ratio", str(t["warmup_ratio"]), "--seed", str(t["seed"]), "--limit", str(d["limit"]),
            "--split-seed", str(d["seed"]), "--test-fraction", str(d["test_fraction"]), "--padding", "longest"] + extra
    if t.get("max_steps", 0):
        return {"error": "[train] max_steps: the peer runner trains whole epochs"}
    log = pathlib.Path(record["dir"] + ".peer.log")
    start = time.perf_counter()
    with open(log, "w") as err:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
        stdout = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        lines = [l for l in log.read_text().splitlines() if l.strip()]
        return {"error": f"the peer failed ({lines[-1] if lines else 'no output'}; {log})", "method": method}
    j = json.loads(stdout.strip().splitlines()[-1])
    label = method + (" over nf4" if "--quantize" in extra else "")
    return {"peer": j["peer"], "method": label, "test_accuracy": j["test_accuracy"], "examples_per_s": j["examples_per_s"],
            "peak_rss_mib": usage.ru_maxrss / 1024, "wall_seconds": time.perf_counter() - start}


for record in results["runs"]:
    setup = record["setup"]
    if setup in peers or not record.get("ok"):
        continue  # the first finished seed of each setup
    print(f"[assess_peers] {setup}", file=sys.stderr, flush=True)
    peers[setup] = run_peer(setup, record)
    if "error" in peers[setup]:
        print(f"[assess_peers] {setup}: {peers[setup]['error']}", file=sys.stderr, flush=True)
    peers_file.write_text(json.dumps(peers, indent=1) + "\n")
peers_file.write_text(json.dumps(peers, indent=1) + "\n")
