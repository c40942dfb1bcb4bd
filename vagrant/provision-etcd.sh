#!/bin/sh
# etcd for the lab: listens on the private network, v2 API on too (old flanneld peers use it).
set -eu
ETCD_IP="$1"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q etcd-server etcd-client
cat > /etc/default/etcd <<EOT
ETCD_NAME=etcd
ETCD_LISTEN_CLIENT_URLS=http://${ETCD_IP}:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://${ETCD_IP}:2379
ETCD_ENABLE_V2=true
EOT
systemctl restart etcd
# The network config, where the RPM-style sysconfig points flanneld (/atomic.io/network).
ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:2379 put /atomic.io/network/config \
  '{"Network":"10.5.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}'
