#!/usr/bin/env bash
# The "Running on a cluster" commands of docs/SCALE.md, with both Ray nodes on this machine:
# a head node and a second node joining it, one CPU each, then a sweep submitted to the cluster.
# On real machines run the second `ray start` on the other node, with the head's address.
#   bash examples/cluster-localhost.sh runs/cluster
set -euo pipefail
out=${1:-runs/cluster}
head_ip=$(hostname -I | awk '{print $1}')
# Ray 2.60 protects a `ray start` cluster with a token (~/.ray/auth_token, written by the head):
# copy that file to every node, and let every ray command and driver use it.
export RAY_AUTH_MODE=token
set -x
ray start --head --port=6379 --num-cpus=1 --include-dashboard=false
ray start --address="$head_ip:6379" --num-cpus=1
ray status
crome sweep examples/sweep.toml --out "$out" --ray-address auto
crome summarize "$out" --markdown "$out/summary.md"
ray stop
