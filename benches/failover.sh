#!/usr/bin/env bash
# Leader failover (root): a `meshctl lab --registry kube` of two locations of two nodes (loc2
# behind NAT), agents with --failover-hold=15s. 20 runs of `meshctl lab chaos leader-blackhole`,
# alternating the leader of loc1 (public) and of loc2 (behind NAT): each drops the leader's
# forwarding until the location failed over, lifts it, and waits for the leader's return
# (docs/operations.md). After each run the location's other node's agent is restarted, which
# forgets how often it reported that leader: every run starts from the first hold (15 s), not a
# doubled one. MESHCTL=path overrides the meshctl binary (default the release
# build); RUNS=n the number of runs.
# Prints `failover runs=… passed=… public_cut_s=… nat_cut_s=… …` (comma-separated per run).
set -euo pipefail
cd "$(dirname "$0")/.."
M=${MESHCTL:-./target/release/meshctl}
runs=${RUNS:-20}
lab=fobench
cleanup() { "$M" lab down --name "$lab" >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup
"$M" lab up --name "$lab" --registry kube --nodes 4 --locations 2 \
  --agent-arg=--failover-hold=15s >/dev/null
dir=$(mktemp -d)
# The leader and the other node of a location, from `lab status`.
roles() {
  "$M" lab status --name "$lab" -o json | python3 -c '
import json, sys
n = [x for x in json.load(sys.stdin)["nodes"] if x["location"] == sys.argv[1]]
print(" ".join([x["name"] for x in n if x["leader"]] + [x["name"] for x in n if not x["leader"]]))' "$1"
}
for i in $(seq "$runs"); do
  if [ $((i % 2)) = 1 ]; then loc=loc1; kind=public; else loc=loc2; kind=nat; fi
  read -r leader member < <(roles "$loc")
  "$M" lab chaos --name "$lab" leader-blackhole "$leader" > "$dir/$i.txt" 2>&1 || true
  echo "$kind" >> "$dir/$i.txt"
  "$M" lab chaos --name "$lab" restart-agent "$member" > /dev/null 2>&1 || true
done
python3 - "$dir" "$runs" <<'PY'
import os, re, sys
d, runs = sys.argv[1], int(sys.argv[2])
out = {"public": {}, "nat": {}}
passed = 0
num = lambda pat, t: (m := re.search(pat, t)) and m.group(1)
for i in range(1, runs + 1):
    t = open(os.path.join(d, f"{i}.txt")).read()
    kind = t.strip().splitlines()[-1]
    passed += "\n  passed:" in t
    row = {
        "takeover_s": num(r"took over ([\d.]+)s", t),
        "cut_s": num(r"cut off for ([\d.]+)s", t),
        "returned_s": num(r"led again ([\d.]+)s", t),
        "return_cut_s": num(r"lifted; cut off ([\d.]+)s", t),
        "overlap_s": num(r"at once for ([\d.]+)s", t),
        "changes": num(r"leader changes: (\d+)", t),
    }
    for k, v in row.items():
        out[kind].setdefault(k, []).append(v or "nan")
fields = [f"runs={runs}", f"passed={passed}"]
for kind, cols in out.items():
    for k, v in cols.items():
        fields.append(f"{kind}_{k}={','.join(v)}")
print("failover " + " ".join(fields))
PY
rm -rf "$dir"
