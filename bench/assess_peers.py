"""The peer libraries' side of an assessment: `tessera assess --peers` runs this after its own
runs (or run it by hand: python bench/assess_peers.py OUT, then `tessera assess MATRIX` again
to re-render). For each setup in OUT/results.json whose method a peer library has — peft, or
AdapterHub's adapters in its own venv, or transformers alone for full fine-tuning — the same task through bench/peer_hf_peft.py with the
run's own data, split, limit, batch, length, epochs, rates, seed and threads (read from the
run's resolved config), measured as Tessera's runs are: the child's peak RSS (ru_maxrss), its
training examples/s, its test accuracy — for every seed the setup finished, as Tessera's own rows
are means over them. Writes OUT/peers.json, one entry per setup: the means over its seeds, with
each seed's run under "runs" (an "error" where no peer applies or every seed's peer failed); a
seed already there is not run again.

Sequence classification on an encoder runs through bench/peer_hf_peft.py (peft's methods,
AdapterHub's bottleneck presets, and AdapterHub's MAM and UniPELT for the composition groups that
are those methods); a causal LM on a LLaMA-family decoder through bench/peer_lm_peft.py, its
peft config built from the run's own method keys (Tessera's plugins that mirror peft take peft's
key names). Other groups, and the methods no peer library has, are listed with the reason."""
import dataclasses
import json
import math
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


def adapterhub_group(cfg):
    """'mam' or 'unipelt' when a config's methods and group are AdapterHub's MAMConfig or
    UniPELTConfig (configs/hybrid/mam.toml, unipelt.toml: the prefix MLP's input as wide as the
    model), else None: a group the peer has no preset for."""
    methods, groups = cfg.get("methods", []), cfg.get("groups", [])
    by = {m["plugin"]: m.get("params", {}) for m in methods}
    names = {m["plugin"]: m["name"] for m in methods}
    if len(by) != len(methods) or len(groups) != 1:
        return None
    g, members = groups[0], set(groups[0].get("members", []))
    prefix, adapter = by.get("prefix_tuning", {}), by.get("bottleneck", {})
    preset_prefix = lambda n, w: prefix.get("num_virtual_tokens") == n and prefix.get("encoder_hidden_size") == w and \
        prefix.get("prefix_projection") and prefix.get("shift_positions") is False and prefix.get("embedding_width", "hidden") == "hidden"
    if g.get("kind") == "parallel" and set(by) == {"prefix_tuning", "bottleneck"} and members == set(names.values()) and \
            adapter.get("config") == "par_bn" and preset_prefix(30, 800):
        return "mam"  # prefix tuning (30, MLP 800) beside a parallel adapter, positions left alone
    if g.get("kind") == "gated" and set(by) == {"lora", "prefix_tuning", "bottleneck"} and \
            members == {names["lora"], names["prefix_tuning"]} and adapter.get("config") == "seq_bn" and adapter.get("use_gating") and \
            by["lora"].get("r") == 8 and sorted(m.get("targets", []) for m in methods if m["plugin"] == "lora")[0] == ["attn.q", "attn.v"] and \
            preset_prefix(10, 512):
        return "unipelt"  # gated LoRA r 8 on q, v and a gated 10-token prefix, beside a gated seq_bn adapter
    return None


def peer_method(cfg):
    """(peer_hf_peft.py --method, extra args) for a resolved config, or a reason why none."""
    if cfg.get("groups"):
        group = adapterhub_group(cfg)
        if group and cfg["model"].get("quantize", "none") != "none":
            return None, f"{group} over quantize = {cfg['model']['quantize']}: no peer"
        return ((group, []), None) if group else (None, "a composition group that is neither AdapterHub's MAM nor UniPELT: no peer")
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
        preset, kwargs = adapterhub_bn(p)
        return (None, kwargs) if preset is None else ((preset, extra + ["--adapterhub-kwargs", json.dumps(kwargs)]), None)
    return None, f"no peer library has {plugin}"


# Tessera's decoder site names -> the LLaMA family's module names (peft's target_modules).
LLAMA_TARGETS = {"attn.q": "q_proj", "attn.k": "k_proj", "attn.v": "v_proj", "attn.o": "o_proj", "mlp.gate": "gate_proj",
                 "mlp.up": "up_proj", "mlp.down": "down_proj"}
# Tessera's plugins that mirror a peft method -> its config class.
PEFT_CLASSES = {"lora": "LoraConfig", "adalora": "AdaLoraConfig", "loha": "LoHaConfig", "lokr": "LoKrConfig", "vera": "VeraConfig",
                "ia3": "IA3Config", "prompt_tuning": "PromptTuningConfig", "p_tuning": "PromptEncoderConfig",
                "prefix_tuning": "PrefixTuningConfig", "ln_tuning": "LNTuningConfig"}
# Keys that mean "unset" in a resolved config, where peft's own default applies.
UNSET = ("", [], {}, None)
# The bottleneck and compacter plugins' keys that AdapterHub's adapter configs have, under the
# same names and meanings (plugins/additive/bottleneck/README.md).
BN_SHARED = ("reduction_factor", "non_linearity", "init_weights", "dropout", "residual_before_ln", "cross_adapter", "use_gating",
             "phm_dim", "phm_rank", "phm_bias", "phm_c_init", "phm_init_range", "learn_phm", "factorized_phm_W", "factorized_phm_rule",
             "shared_W_phm", "shared_phm_rule", "hypercomplex_nonlinearity")


def adapterhub_bn(p):
    """(AdapterHub preset, its kwargs) for a bottleneck or compacter method's resolved params: the
    run's own keys over the preset's (a key at "the preset's" passes nothing), or (None, why not)."""
    if p.get("bottleneck_size"):
        return None, "bottleneck_size: AdapterHub sizes an adapter by reduction_factor alone"
    if p.get("inv_adapter") not in UNSET or (p.get("config") or "").endswith("_inv"):
        return None, "an invertible adapter: the peer runners add no invertible adapter"
    kwargs = {k: p[k] for k in BN_SHARED if p.get(k) not in UNSET and not (k == "reduction_factor" and p[k] == 0)}
    if p.get("scaling_type") in ("learned", "channel"):
        kwargs["scaling"] = p["scaling_type"]  # AdapterHub names a trained scaling by its kind
    elif p.get("scaling"):
        kwargs["scaling"] = p["scaling"]
    return p.get("config") or "seq_bn", kwargs


def lm_peer(cfg):
    """(peer_lm_peft.py args, label) for a resolved causal-LM config, or (None, why not)."""
    path = pathlib.Path(cfg["model"]["path"])
    if path.suffix == ".gguf" or cfg["model"].get("quantize") == "gguf":
        return None, "no peer trains on a GGUF file's blocks (transformers dequantizes a GGUF at load)"
    arch = json.loads((path / "config.json").read_text()).get("model_type") if (path / "config.json").exists() else "unknown"
    if arch not in ("llama", "mistral"):
        return None, f"the decoder peer runner covers the LLaMA family, not {arch}"
    d, model = cfg["data"], cfg["model"]
    if d.get("prompt_column") or d.get("target_column") or d.get("text_column", "text") != "text" or d.get("format", "auto") not in ("auto", "csv") \
            or not str(d["path"]).endswith(".csv"):
        return None, "the decoder peer runner reads a CSV's 'text' column alone (no prompt or target column)"
    if model.get("dtype", "f32") != "f32" or model.get("tokenizer") or model.get("device", "cpu") != "cpu":
        return None, "the decoder peer runner loads the model in f32 on the CPU with its own tokenizer.json"
    if cfg.get("groups"):  # AdapterHub's MAM and UniPELT presets, on LLaMA as on BERT
        group = adapterhub_group(cfg)
        if not group:
            return None, "a composition group that is neither AdapterHub's MAM nor UniPELT: no peer"
        if model.get("quantize", "none") != "none" or cfg["train"].get("gradient_checkpointing"):
            return None, f"{group} over a quantized base or with gradient checkpointing: no peer"
        return ["--adapterhub", json.dumps({"config": group, "kwargs": {}})], group
    methods = cfg.get("methods", [])
    if len(methods) != 1:
        return None, "no methods (the base alone)" if not methods else "several methods: no peer runner"
    m = methods[0]
    plugin, p = m["plugin"], dict(m.get("params", {}))
    q, extra = cfg["model"].get("quantize", "none"), []
    if cfg["model"].get("quantize_targets"):
        return None, "[model.quantize_targets]: no peer"
    if q == "nf4" and cfg["model"].get("double_quant"):
        extra += ["--quantize", "nf4"]  # bitsandbytes NF4 with double quantization: QLoRA as peft users run it
    elif q != "none":
        return None, f"quantize = {q}{' without double_quant' if q == 'nf4' else ''}: no peer"
    if cfg["train"].get("gradient_checkpointing"):
        extra += ["--gradient-checkpointing"]
    if plugin == "full":
        if m.get("targets") or not p.get("embeddings", True):
            return None, "full fine-tuning of some weights: no peer"
        return extra + ["--full"], "full"
    if plugin in ("bottleneck", "compacter"):  # AdapterHub's preset of that name, with the run's keys
        preset, kwargs = adapterhub_bn(p)
        if preset is None:
            return None, kwargs
        return extra + ["--adapterhub", json.dumps({"config": preset, "kwargs": kwargs})], preset
    if plugin not in PEFT_CLASSES:
        return None, f"no peer library has {plugin} for decoders here"
    method = "lora_fa" if p.pop("lora_fa", False) else plugin
    if plugin == "prefix_tuning" and p.pop("init_weights", None) == "zero":
        return None, "prefix_tuning with init_weights = zero: peft's prefix has no such start"
    named = [k for k in ("rank_pattern", "alpha_pattern", "feedforward_modules", "layers_to_transform") if p.get(k) not in UNSET]
    if named:
        return None, f"{', '.join(named)}: Tessera's site names are not mapped to peft's here"
    import peft  # the field names the peer's config class takes (this runs in the peft venv)

    fields = {f.name for f in dataclasses.fields(getattr(peft, PEFT_CLASSES[plugin]))}
    kwargs = {k: ({"true": True, "false": False}.get(v, v) if isinstance(v, str) else v) for k, v in p.items()
              if k in fields and v not in UNSET and not (k in ("num_transformer_submodules", "encoder_hidden_size", "total_step") and v == 0)}
    if m.get("targets"):
        unknown = [t for t in m["targets"] if t not in LLAMA_TARGETS]
        if unknown:
            return None, f"targets {unknown}: no LLaMA module name known"
        kwargs["target_modules"] = [LLAMA_TARGETS[t] for t in m["targets"]]
    label = ("dora" if kwargs.get("use_dora") else method) + (" over nf4" if "--quantize" in extra else "")
    return extra + ["--method", "lora_fa" if method == "lora_fa" else "lora",
                    "--peft-config", json.dumps({"class": PEFT_CLASSES[plugin], "kwargs": kwargs})], label


def classifier_argv(cfg):
    """(argv, label, python) for sequence classification through peer_hf_peft.py, or (None, why, None)."""
    what, why = peer_method(cfg)
    if what is None:
        return None, why, None
    method, extra = what
    adapterhub = method.endswith("_bn") or method.startswith("compacter") or method in ("mam", "unipelt")
    t = cfg["train"]
    argv = [str(here / "peer_hf_peft.py"), "--method", method, "--head-lr", str(t["head_lr"]), "--max-grad-norm", str(t["max_grad_norm"]),
            "--padding", "longest"] + extra
    return argv, method + (" over nf4" if "--quantize" in extra else ""), adapters_venv if adapterhub else venv


def run_peer(setup, record):
    cfg = tomllib.loads(pathlib.Path(record["dir"] + ".toml").read_text())
    t, d = cfg["train"], cfg["data"]
    if t.get("max_steps", 0):
        return {"error": "[train] max_steps: the peer runner trains whole epochs"}
    if cfg["task"]["kind"] == "sequence-classification":
        script, label, env = classifier_argv(cfg)
    elif cfg["task"]["kind"] == "causal-lm":
        args, label = lm_peer(cfg)
        script, env = (None, None) if args is None else ([str(here / "peer_lm_peft.py"), "--eval-batch-size", str(t["eval_batch_size"]),
                                                           "--max-grad-norm", str(t["max_grad_norm"])] + args +
                                                          ([] if t.get("shuffle", True) else ["--no-shuffle"]) +
                                                          ([] if t.get("group_by_length", False) else ["--no-group-by-length"]),
                                                          adapters_venv if "--adapterhub" in args else venv)
    else:
        script, label = None, f"the peer runner covers sequence classification and causal LMs, not {cfg['task']['kind']}"
    if script is None:
        return {"error": label}
    threads = t["threads"] or os.cpu_count()
    argv = [str(pathlib.Path(env) / "bin" / "python")] + script + [
        "--model", cfg["model"]["path"], "--data", d["path"], "--epochs", str(t["epochs"]), "--batch-size", str(t["batch_size"]),
        "--max-length", str(d["max_length"]), "--threads", str(threads), "--lr", str(t["lr"]), "--weight-decay", str(t["weight_decay"]),
        "--warmup-ratio", str(t["warmup_ratio"]), "--seed", str(t["seed"]), "--limit", str(d["limit"]),
        "--split-seed", str(d["seed"]), "--test-fraction", str(d["test_fraction"])]
    log = pathlib.Path(record["dir"] + ".peer.log")
    start = time.perf_counter()
    with open(log, "w") as err:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
        stdout = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        lines = [l for l in log.read_text().splitlines() if l.strip()]
        return {"error": f"the peer failed ({lines[-1] if lines else 'no output'}; {log})", "method": label}
    j = json.loads(stdout.strip().splitlines()[-1])
    metric = {k: j[k] for k in ("test_accuracy", "test_perplexity", "tokens_per_s") if k in j}
    if not all(math.isfinite(v) for v in metric.values()):  # JSON has no NaN: the report could not read it
        return {"error": f"the peer diverged ({metric}; {log})", "method": label}
    return {"peer": j["peer"], "method": label, **metric, "examples_per_s": j["examples_per_s"],
            "peak_rss_mib": usage.ru_maxrss / 1024, "wall_seconds": time.perf_counter() - start}


def summary(runs, seeds):
    """A setup's peer entry from its runs: the means over those of `seeds` (the seeds ours
    finished in this matrix, so both sides' means are over the same seeds) of the fields one run
    has (so a report reads one entry alike), each seed's metric, their sample standard deviation
    (n - 1, as the report's own rows), and every run kept (a seed dropped since may come back).
    Seeds whose peer failed are counted out of the means and listed."""
    counted = [r for r in runs if r["seed"] in seeds]
    ok = [r for r in counted if "error" not in r]
    if not ok:
        first = counted[0] if counted else runs[0]
        return {**{k: v for k, v in first.items() if k != "seed"}, "runs": runs}
    entry = {"peer": ok[0]["peer"], "method": ok[0]["method"], "seeds": [r["seed"] for r in ok], "runs": runs,
             "failed_seeds": [r["seed"] for r in counted if "error" in r]}
    for k in ("test_accuracy", "test_perplexity", "tokens_per_s", "examples_per_s", "peak_rss_mib", "wall_seconds"):
        if all(k in r for r in ok):
            entry[k] = sum(r[k] for r in ok) / len(ok)
    metric = "test_accuracy" if "test_accuracy" in entry else "test_perplexity"
    values = [r[metric] for r in ok]
    entry["metric_values"] = values
    entry["metric_spread"] = math.sqrt(sum((v - entry[metric]) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return entry


def earlier_runs(setup):
    """The runs peers.json already holds for a setup; an entry written before peers ran every
    seed is one run, of the setup's first finished seed (the one it ran, unless the matrix's
    seeds changed since)."""
    e = peers.get(setup)
    if e is None:
        return []
    if "runs" in e:
        return e["runs"]
    first = next((r for r in results["runs"] if r["setup"] == setup and r.get("ok")), None)
    return [] if first is None else [{**e, "seed": first["seed"]}]


# Every finished seed of each setup, as Tessera's own rows: the peer's column is then a mean over
# the same seeds. A refusal before any run (no peer has the method: no "method" named) holds for
# every seed, and is said once. Every setup's entry is summed up again on every call, so a seed
# no longer in the matrix leaves its means.
for setup in dict.fromkeys(r["setup"] for r in results["runs"]):
    finished = [r for r in results["runs"] if r["setup"] == setup and r.get("ok")]
    runs = earlier_runs(setup)
    seeds = {r["seed"] for r in finished}
    for record in finished:
        if (runs and "method" not in runs[0]) or record["seed"] in {r["seed"] for r in runs}:
            continue
        print(f"[assess_peers] {setup}, seed {record['seed']}", file=sys.stderr, flush=True)
        run = {**run_peer(setup, record), "seed": record["seed"]}
        if "error" in run:
            print(f"[assess_peers] {setup}, seed {record['seed']}: {run['error']}", file=sys.stderr, flush=True)
        runs.append(run)
        peers[setup] = summary(runs, seeds)
        peers_file.write_text(json.dumps(peers, indent=1) + "\n")
    if runs and seeds:
        peers[setup] = summary(runs, seeds)
peers_file.write_text(json.dumps(peers, indent=1) + "\n")
