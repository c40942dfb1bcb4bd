#!/bin/sh
# etcd for the lab: listens on the private network, v2 API on too (the config is written the classic way,
# with the v2 keys API, and old flanneld peers use it).
set -eu
ETCD_IP="$1"
export DEBIAN_FRONTEND=noninteractive

# apt only for what is missing: a box or root with the packages already in it (the systemd machines lab,
# `flannelctl lab up --machines`, has no network to Debian) provisions offline.
missing=
for p in etcd-server etcd-client; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    apt-get update -q
    # shellcheck disable=SC2086  # one word per package
    apt-get install -y -q $missing
fi

cat > /etc/default/etcd <<EOT
ETCD_NAME=etcd
ETCD_LISTEN_CLIENT_URLS=http://${ETCD_IP}:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://${ETCD_IP}:2379
ETCD_ENABLE_V2=true
EOT
systemctl enable etcd  # the package does on install; an image made with etcd disabled (docker-image.sh) too
systemctl restart etcd
tries=0
until ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:2379 endpoint health >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ "$tries" -lt 60 ] || { echo "provision-etcd: etcd does not answer on 127.0.0.1:2379" >&2; exit 1; }
    sleep 1
done

# The network config where the RPM-style sysconfig points flanneld (/atomic.io/network), written as the
# classic CentOS/Atomic guides do. `mk` refuses to overwrite: a second provisioning keeps the running config.
CONFIG='{"Network":"10.5.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}'
if ! ETCDCTL_API=2 etcdctl --endpoints=http://127.0.0.1:2379 get /atomic.io/network/config >/dev/null 2>&1; then
    ETCDCTL_API=2 etcdctl --endpoints=http://127.0.0.1:2379 mk /atomic.io/network/config "$CONFIG"
fi
echo "etcd on ${ETCD_IP}:2379 (v2 enabled), config $(ETCDCTL_API=2 etcdctl --endpoints=http://127.0.0.1:2379 get /atomic.io/network/config)"
