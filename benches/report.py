#!/usr/bin/env python3
"""Turn the results in target/bench-results/ (and criterion's estimates) into BENCHMARKS.md."""
import json
import os
import platform
import re
import statistics
import subprocess
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "target/bench-results"
crit = "target/criterion"


def estimate(group, bench_id):
    """Median point estimate in seconds from criterion's JSON, or None."""
    path = os.path.join(crit, group, *bench_id.split("/"), "new", "estimates.json")
    try:
        with open(path) as f:
            return json.load(f)["median"]["point_estimate"] / 1e9
    except (OSError, KeyError, ValueError):
        return None


def fmt(sec):
    if sec is None:
        return "not measured"
    if sec < 1e-3:
        return f"{sec * 1e6:.1f} µs"
    return f"{sec * 1e3:.2f} ms"


def verdict(sec, target):
    if sec is None:
        return "not measured"
    return "met" if sec <= target else "**missed**"


def machine():
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} cores ({cpu}), {rustc}"


lines = []
w = lines.append
w("# Benchmarks")
w("")
w("Written by `benches/run.sh` (do not edit by hand). Machine: " + machine() + ".")
w("The machine is shared: figures are medians; re-run `benches/run.sh` to refresh them.")
w("Binaries and benches use the mimalloc allocator (the engine makes many small allocations).")
w("")
w("## Topology engine (`benches/engine.rs`, criterion)")
w("")
w("One node's full view computed from scratch (`topology::compute`), synthetic clusters with")
w("10 nodes per location, every node with an endpoint, an internal IP and a /24 pod CIDR.")
w("Kilo 0.6.0's engine on a machine like ours (reference given with the issue) took 5.5 ms for")
w("1000 nodes and 33.7 ms for 5000 nodes (full mesh), 15.6 ms for 5000 nodes by location.")
w("")
w("| nodes | granularity | wiremesh | Kilo 0.6.0 (reference) | target |")
w("| ---: | --- | ---: | ---: | --- |")
kilo = {("full", 1000): "5.5 ms", ("full", 5000): "33.7 ms", ("location", 5000): "15.6 ms"}
for n in (100, 1000, 5000):
    for g in ("full", "location"):
        e = estimate("compute", f"{g}/{n}")
        target = ""
        if (g, n) == ("full", 5000):
            target = f"≤ 2 ms: {verdict(e, 2e-3)}"
        w(f"| {n} | {g} | {fmt(e)} | {kilo.get((g, n), '')} | {target} |")
w("")
w("One event applied by the incremental engine (`topology::incremental::Engine`) at 5000 nodes:")
w("a node's endpoint moves (the common case). Target ≤ 50 µs.")
w("")
w("| event | granularity | time | target |")
w("| --- | --- | ---: | --- |")
for g in ("full", "location"):
    e = estimate("incremental", f"endpoint-move_{g}/5000")
    w(f"| endpoint moves | {g} | {fmt(e)} | ≤ 50 µs: {verdict(e, 50e-6)} |")
w("")

plan = os.path.join(out, "plan-5000.txt")
if os.path.exists(plan):
    text = open(plan).read()
    parse = [float(x) for x in re.findall(r"parse: ([0-9.]+) ms", text)]
    engine = [float(x) for x in re.findall(r"engine: ([0-9.]+) ms", text)]
    total = [int(x) / 1000 for x in re.findall(r"total: ([0-9]+) us", text)]
    if total:
        w("## `meshctl plan` on a 5000-node file")
        w("")
        w("`meshctl plan --nodes nodes-5000.json --node node-00000 --granularity full -o json --timings`,")
        w(f"a {os.path.getsize(os.path.join(out, 'nodes-5000.json')) // 1024} KiB NodeList, 5 runs, whole process.")
        w("Target: well under a second.")
        w("")
        w("| phase | median |")
        w("| --- | ---: |")
        w(f"| parse (read + decode + validate) | {statistics.median(parse):.1f} ms |")
        w(f"| engine (topology + desired state) | {statistics.median(engine):.2f} ms |")
        w(f"| whole process | {statistics.median(total):.0f} ms |")
        w("")

kernel = os.path.join(out, "kernel.md")
if os.path.exists(kernel):
    lines.append(open(kernel).read().rstrip())
    w("")
print("\n".join(lines))
