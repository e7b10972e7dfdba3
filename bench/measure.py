"""Runs one command and prints its peak resident set size (MiB) as JSON, measured the
same way for Tessera and its peer: the kernel's ru_maxrss of the finished child."""
import json
import resource
import subprocess
import sys

rc = subprocess.call(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"command": sys.argv[1], "rc": rc, "peak_rss_mib": peak}), file=sys.stderr)
sys.exit(rc)
