#!/usr/bin/env bash
# Two hosts and an etcd host on one machine, as network namespaces on a shared "underlay"
# bridge; a discovery node with --overlay on each host, one container on each; containers
# reach each other by DNS name across the VXLAN overlay. Run as root (README "Overlay").
#
#   examples/overlay-demo.sh up       build it all and ping b1 from a1 by name
#   examples/overlay-demo.sh kill-b   SIGKILL host B's node; watch A forget B after the TTL
#   examples/overlay-demo.sh start-b  start B's node again (same name, same node_ip)
#   examples/overlay-demo.sh down     remove every namespace and process it made
#
# Namespaces: demo-ul (bridge br0), demo-infra (etcd, 192.168.100.100), demo-a
# (192.168.100.1), demo-b (192.168.100.2), containers demo-a1 and demo-b1. Logs and pid
# files in $DEMO_DIR (default /tmp/discovery-overlay-demo), namespaces named $DEMO_PREFIX-* (demo). DISCOVERY names the server
# command (default: `discovery` on PATH, else .venv/bin/discovery of this checkout); the
# containers are plumbed by the `discovery-cni` next to it, through each node's CNI socket.
set -euo pipefail

P=${DEMO_PREFIX:-demo}   # namespaces and /etc/netns entries are named $P-*
UNDERLAY=192.168.100
ETCD=http://$UNDERLAY.100:2379
TTL=${TTL:-10}
DEMO_DIR=${DEMO_DIR:-/tmp/discovery-overlay-demo}
HERE=$(cd "$(dirname "$0")/.." && pwd)
DISCOVERY=${DISCOVERY:-$(command -v discovery || echo "$HERE/.venv/bin/discovery")}
CNI=${CNI:-$(dirname "$DISCOVERY")/discovery-cni}
NETWORK='{"subnet": "10.244.0.0/16", "node_prefix": 24, "backend": "vxlan", "vni": 1, "port": 8472, "mtu": 1450}'

on() { ip netns exec "$P-$1" "${@:2}"; }
api() { on "$1" curl -sf -X "$2" "http://127.0.0.1:8080$3" "${@:4}"; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then echo "timed out: $what" >&2; exit 1; fi
    sleep 0.2
  done
}

host() {  # host NAME ADDRESS: a namespace with eth0 on the underlay bridge
  ip netns add "$P-$1"
  ip -n "$P-$1" link set lo up
  ip -n "$P-ul" link add "p-$1" type veth peer name eth0 netns "$P-$1"
  ip -n "$P-ul" link set "p-$1" master br0 up
  ip -n "$P-$1" addr add "$2/24" dev eth0
  ip -n "$P-$1" link set eth0 up
}

start_node() {  # start_node NAME ADDRESS
  # not through on(): a function in the background is a subshell, and $! must be the node
  ip netns exec "$P-$1" "$DISCOVERY" serve --etcd "$ETCD" --node "$1" --node-ip "$2" --node-ttl "$TTL" \
    --overlay --dns 0.0.0.0:53 --http 127.0.0.1:8080 --cni-socket "$DEMO_DIR/cni-$1.sock" \
    >>"$DEMO_DIR/node-$1.log" 2>&1 &
  echo $! >"$DEMO_DIR/node-$1.pid"
  wait_for 30 "node $1 ready" api "$1" GET /readyz
}

container() {  # container HOST NAME: a namespace plumbed by discovery-cni ADD via HOST's node
  local host=$1 name=$2 ns=$P-$2 result gateway
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  result=$(CNI_COMMAND=ADD CNI_CONTAINERID="$name-0001" CNI_NETNS="/var/run/netns/$ns" \
    CNI_IFNAME=eth0 CNI_PATH=/opt/cni/bin "$CNI" <<EOF
{"cniVersion": "1.0.0", "name": "pods", "type": "discovery-cni", "bridge": "cni0",
 "isGateway": true, "socket": "$DEMO_DIR/cni-$host.sock",
 "args": {"cni": {"discovery": {"name": "$name"}}}}
EOF
  )
  gateway=$(jq -r '.ips[0].gateway' <<<"$result")
  mkdir -p "/etc/netns/$ns"
  printf 'nameserver %s\nsearch pods.net.cluster.local\noptions ndots:1\n' "$gateway" \
    >"/etc/netns/$ns/resolv.conf"
  echo "container $name on host $host: $(jq -r '.ips[0].address' <<<"$result") via $gateway"
}

up() {
  command -v jq >/dev/null || { echo "needs jq" >&2; exit 1; }
  mkdir -p "$DEMO_DIR"
  ip netns add "$P-ul"
  ip -n "$P-ul" link set lo up
  ip -n "$P-ul" link add br0 type bridge
  ip -n "$P-ul" link set br0 up
  host infra "$UNDERLAY.100"
  host a "$UNDERLAY.1"
  host b "$UNDERLAY.2"

  ip netns exec "$P-infra" etcd --name infra --data-dir "$DEMO_DIR/etcd" \
    --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster infra=http://127.0.0.1:2380 >>"$DEMO_DIR/etcd.log" 2>&1 &
  echo $! >"$DEMO_DIR/etcd.pid"
  wait_for 30 "etcd healthy" on infra curl -sf "$ETCD/health"

  start_node a "$UNDERLAY.1"
  start_node b "$UNDERLAY.2"
  api a PUT /v1/networks/pods -d "$NETWORK" >/dev/null
  container a a1
  container b b1
  wait_for 20 "a1 reaches b1" on a1 ping -c1 -W1 b1
  on a1 ping -c3 b1
}

kill_b() {
  kill -KILL "$(cat "$DEMO_DIR/node-b.pid")"
  echo "B's node killed at $(date +%T); its lease ends within ${TTL}s"
}

down() {
  for pid in "$DEMO_DIR"/*.pid; do
    [[ -e $pid ]] && kill -KILL "$(cat "$pid")" 2>/dev/null || true
    rm -f "$pid"
  done
  for ns in a1 b1 a b infra ul; do
    ip netns del "$P-$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$P-$ns"
  done
  rm -rf "$DEMO_DIR"
}

case ${1:-} in
  up) up ;;
  kill-b) kill_b ;;
  start-b) start_node b "$UNDERLAY.2" ;;
  down) down ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
