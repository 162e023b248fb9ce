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

def kv(path, prefix):
    """The key=value pairs of the lines of `path` that start with `prefix`, one dict per line."""
    rows = []
    if not os.path.exists(path):
        return rows
    for line in open(path):
        if line.startswith(prefix + " "):
            rows.append(dict(p.split("=", 1) for p in line.split()[1:] if "=" in p))
    return rows


routes = kv(os.path.join(out, "routes.txt"), "route_bench")
dels = {r["n"]: r for r in kv(os.path.join(out, "routes.txt"), "route_bench_del")}
if routes:
    w("## Route programming (`examples/route_bench.rs`, root)")
    w("")
    w("The reconciler's netlink layer installs N /32 routes into a fresh namespace (batched: 256")
    w("requests a datagram, 4 datagrams in flight), against `ip -batch` doing the same in the same")
    w("run. Medians of 5 rounds; the ratio is taken within each round. Target ≥ 1.0× of ip -batch.")
    w("")
    w("| routes | wiremesh add/s | ip -batch add/s | ratio | wiremesh del/s | ip -batch del/s | ratio | target |")
    w("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in routes:
        d = dels.get(r["n"], {})
        ok = "met" if float(r["ratio"]) >= 1.0 else "**missed**"
        w(f"| {r['n']} | {float(r['ours_routes_per_s']):,.0f} | {float(r['ipbatch_routes_per_s']):,.0f} | "
          f"{float(r['ratio']):.2f}× | {float(d.get('ours_routes_per_s', 0)):,.0f} | "
          f"{float(d.get('ipbatch_routes_per_s', 0)):,.0f} | {float(d.get('ratio', 0)):.2f}× | ≥ 1.0×: {ok} |")
    w("")

for r in kv(os.path.join(out, "wg.txt"), "wg_bench"):
    w("## WireGuard peers (`examples/wg_bench.rs`, root)")
    w("")
    w(f"Userspace backend (wireguard-go) in a fresh namespace, {r['peers']} peers, medians of {r['runs']} runs.")
    w("")
    w("| operation | time |")
    w("| --- | ---: |")
    w(f"| apply {r['peers']} peers at once | {r['apply_all_ms']} ms |")
    w(f"| read the device back | {r['read_all_ms']} ms |")
    w(f"| apply one changed peer among {r['peers']} | {r['one_changed_ms']} ms |")
    w(f"| read + diff + apply one changed peer | {r['reconcile_one_changed_ms']} ms |")
    w(f"| remove all | {r['remove_all_ms']} ms |")
    w("")

for r in kv(os.path.join(out, "convergence.txt"), "convergence_bench"):
    p50, p99 = float(r["p50_ms"]), float(r["p99_ms"])
    w("## Convergence (`examples/convergence_bench.rs`, root)")
    w("")
    w(f"The real agent in a namespace with a {r['nodes']}-node full-mesh file; each of {r['rounds']} rounds")
    w("moves one node's endpoint (atomic rewrite of the file) and measures until the agent reports")
    w("the kernel acknowledged the change. Targets: p50 ≤ 5 ms, p99 ≤ 20 ms.")
    w("")
    w("| first full programming | p50 | p99 | max | target |")
    w("| ---: | ---: | ---: | ---: | --- |")
    ok = "met" if p50 <= 5 and p99 <= 20 else "**missed**"
    w(f"| {r['initial_ms']} ms | {p50:.2f} ms | {p99:.2f} ms | {r['max_ms']} ms | {ok} |")
    w("")

for r in kv(os.path.join(out, "dataplane.txt"), "dataplane"):
    ratio = float(r["ratio"])
    w("## Data plane (`benches/dataplane.sh`, root)")
    w("")
    w("iperf3, 5 s, pod to pod through a two-node `meshctl lab` (real agents, userspace WireGuard,")
    w("CNI bridge, masquerade table) against a bare wireguard-go tunnel between the same two node")
    w("namespaces. Medians of 3 runs; throughput is CPU-bound on this 2-core machine. Target ≥ 0.9×.")
    w("")
    w("| pod to pod through wiremesh | bare wireguard-go tunnel | ratio | target |")
    w("| ---: | ---: | ---: | --- |")
    ok = "met" if ratio >= 0.9 else "**missed**"
    w(f"| {r['mesh_mbps']} Mbit/s | {r['bare_mbps']} Mbit/s | {ratio:.2f}× | ≥ 0.9×: {ok} |")
    w("")
print("\n".join(lines))
