#!/usr/bin/env bash
# Start a throwaway etcd + kube-apiserver on loopback for tests; print `KUBECONFIG=… ETCD_PID=…
# APISERVER_PID=…` lines. Stop both by PID (apiserver first). Recipe: ../shared/kube-apiserver-notes.md.
#   DIR=/tmp/x API_PORT=6443 ETCD_PORT=2379 tests/apiserver/up.sh
# BIND (default 127.0.0.1) is the address the API server listens on (also in its certificate);
# SKIP_ETCD=1 starts only the API server again, on the etcd already running for DIR (its data,
# resourceVersions and PKI kept): an outage and its end.
# CLUSTER=1: the API server of a real cluster (tests/cluster/): the service range SERVICE_RANGE
# (default 10.0.0.0/24) whose first address is in the serving certificate, the `kubernetes`
# Endpoints kept by the API server, ServiceAccount and TaintNodesByCondition admission on,
# privileged pods allowed, kubelets dialled by their InternalIP (never by name through a
# resolver) with a client certificate ($DIR/pki/apiserver-kubelet.crt, group system:masters).
# Authorization and admission as kubeadm and k3s set them: the Node authorizer before RBAC and the
# NodeRestriction admission plugin, so a client certificate for `system:node:NAME` (group
# `system:nodes`, signed by $DIR/pki/ca.crt) is a kubelet's identity with a kubelet's limits.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$("$here/setup.sh")
dir=${DIR:-$(mktemp -d /tmp/wm-kas.XXXXXX)}
api=${API_PORT:-6443}
bind=${BIND:-127.0.0.1}
etcd_port=${ETCD_PORT:-2379}
cluster=${CLUSTER:-0}
services=${SERVICE_RANGE:-10.0.0.0/24}
# The first address of the service range: the `kubernetes` Service's ClusterIP.
first_ip=$(echo "${services%/*}" | awk -F. '{print $1"."$2"."$3"."$4+1}')
pki=$dir/pki
mkdir -p "$pki" "$dir/etcd" "$dir/certs"
if [ ! -f "$pki/ca.crt" ]; then
  # A CA and a separate serving certificate: rustls refuses a self-signed leaf as server cert.
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=wm-kas-ca \
    -addext basicConstraints=critical,CA:TRUE -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout "$pki/apiserver.key" \
    -out "$pki/apiserver.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,IP:%s,IP:%s,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\n' \
    "$bind" "$first_ip" > "$pki/ext"
  openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -days 30 -extfile "$pki/ext" -out "$pki/apiserver.crt" 2>/dev/null
  # The API server's identity towards the kubelets (logs, exec).
  [ "$cluster" != 1 ] || openssl req -newkey rsa:2048 -nodes -subj /O=system:masters/CN=kube-apiserver-kubelet-client \
    -keyout "$pki/apiserver-kubelet.key" -out "$pki/apiserver-kubelet.csr" 2>/dev/null
  [ "$cluster" != 1 ] || openssl x509 -req -in "$pki/apiserver-kubelet.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -days 30 -out "$pki/apiserver-kubelet.crt" 2>/dev/null
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  # An administrator, and the agent as its ServiceAccount would authenticate in a cluster, so the
  # RBAC of manifests/ is what limits it.
  {
    echo 'wm-admin-token,admin,admin-uid,"system:masters"'
    echo 'wm-agent-token,system:serviceaccount:kube-system:wiremesh,wm-agent-uid,"system:serviceaccounts,system:serviceaccounts:kube-system"'
  } > "$pki/tokens.csv"
fi
if [ "$cluster" = 1 ]; then
  mode_flags=(--allow-privileged=true --kubelet-preferred-address-types=InternalIP
    --kubelet-client-certificate="$pki/apiserver-kubelet.crt" --kubelet-client-key="$pki/apiserver-kubelet.key")
else
  mode_flags=(--endpoint-reconciler-type=none --disable-admission-plugins=TaintNodesByCondition,ServiceAccount)
fi
etcd_pid=
if [ "${SKIP_ETCD:-0}" != 1 ]; then
etcd --name wmkas --data-dir "$dir/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$((etcd_port + 1))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((etcd_port + 1))" \
  --initial-cluster "wmkas=http://127.0.0.1:$((etcd_port + 1))" \
  --logger zap --log-outputs stderr > "$dir/etcd.log" 2>&1 &
etcd_pid=$!
fi
"$bin" --etcd-servers="http://127.0.0.1:$etcd_port" \
  --bind-address="$bind" --advertise-address="$bind" --secure-port="$api" \
  --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
  --client-ca-file="$pki/ca.crt" --token-auth-file="$pki/tokens.csv" --authorization-mode=Node,RBAC \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
  --service-cluster-ip-range="$services" --cert-dir="$dir/certs" \
  --enable-priority-and-fairness=false --enable-admission-plugins=NodeRestriction \
  "${mode_flags[@]}" --logtostderr=true --v=1 >> "$dir/apiserver.log" 2>&1 &
api_pid=$!
for _ in $(seq 120); do
  if curl -sf --cacert "$pki/ca.crt" "https://$bind:$api/readyz" >/dev/null 2>&1; then
    break
  fi
  sleep 0.25
done
curl -sf --cacert "$pki/ca.crt" "https://$bind:$api/readyz" >/dev/null || {
  kill "$api_pid" $etcd_pid 2>/dev/null || true
  echo "kube-apiserver did not become ready; see $dir/apiserver.log" >&2
  exit 1
}
cat > "$dir/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: wm-kas
  cluster: {server: "https://$bind:$api", certificate-authority-data: "$(base64 -w0 < "$pki/ca.crt")"}
users:
- name: admin
  user: {token: wm-admin-token}
contexts:
- name: wm-kas
  context: {cluster: wm-kas, user: admin, namespace: default}
current-context: wm-kas
KC
sed -e 's/name: admin$/name: agent/' -e 's/user: admin,/user: agent,/' \
  -e 's/token: wm-admin-token/token: wm-agent-token/' "$dir/kubeconfig" > "$dir/agent.kubeconfig"
echo "KUBECONFIG=$dir/kubeconfig"
echo "AGENT_KUBECONFIG=$dir/agent.kubeconfig"
echo "ETCD_PID=$etcd_pid"
echo "APISERVER_PID=$api_pid"
