"""Runs one command and prints its peak resident set size (MiB) as JSON, measured the
same way for Tessera and its peer: the kernel's ru_maxrss of the finished child.
With TESSERA_BENCH_GPU=1 it also samples the GPU's used memory (NVML, every 5 ms) while
the child runs and prints the peak above what was in use before it started: the child's
device footprint (context, allocator pools, tensors), alike for both sides."""
import json
import os
import resource
import subprocess
import sys
import threading
import time

gpu = os.environ.get("TESSERA_BENCH_GPU") == "1"
if gpu:
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    used = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
    base, peak_gpu, done = used(), 0, threading.Event()

    def sample():
        global peak_gpu
        while not done.is_set():
            peak_gpu = max(peak_gpu, used())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
rc = subprocess.call(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
out = {"command": sys.argv[1], "rc": rc, "peak_rss_mib": peak}
if gpu:
    done.set()
    sampler.join()
    out["peak_gpu_mib"] = (peak_gpu - base) / 2**20
print(json.dumps(out), file=sys.stderr)
sys.exit(rc)
