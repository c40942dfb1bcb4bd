#!/bin/sh
# A Docker host running flannelpy from the synced folder through the shipped systemd unit.
set -eu
ETCD_IP="$1"
MY_IP="$2"
export DEBIAN_FRONTEND=noninteractive

# apt only for what is missing: a box or root with the packages already in it (the systemd machines lab,
# `flannelctl lab up --machines`, has no network to Debian) provisions offline. pip then needs PyPI or a
# wheelhouse given with pip's own PIP_NO_INDEX/PIP_FIND_LINKS, which the install below passes through.
missing=
for p in docker.io iptables iproute2 python3-venv; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    apt-get update -q
    # shellcheck disable=SC2086  # one word per package
    apt-get install -y -q $missing
fi
# Docker's bridge traffic through iptables. Built into some kernels (no module to load, as in the lab's
# machines, which have no /lib/modules): only a missing feature is an error.
if ! modprobe br_netfilter 2>/dev/null && [ ! -d /proc/sys/net/bridge ]; then
    echo "provision-host: warning: br_netfilter is neither loadable nor built in" >&2
fi
echo br_netfilter > /etc/modules-load.d/flannel.conf

# The documented install (README): a venv in /opt/flannelpy made with Debian's own python3,
# /usr/bin/flanneld and flannelctl, the units, the Docker drop-in and /etc/sysconfig/flanneld.
sh /flannelpy/etc/install.sh

# The interface that holds MY_IP (eth1), never the NAT interface: every VirtualBox VM has
# 10.0.2.15 on eth0, so a default-route pick would advertise the same PublicIP from every host.
IFACE=$(ip -o -4 addr show | awk -v ip="$MY_IP" '$4 ~ "^"ip"/" {print $2; exit}')
[ -n "$IFACE" ] || { echo "provision-host: no interface holds $MY_IP" >&2; exit 1; }
sed -i "s|^FLANNEL_ETCD_ENDPOINTS=.*|FLANNEL_ETCD_ENDPOINTS=\"http://${ETCD_IP}:2379\"|" /etc/sysconfig/flanneld
sed -i "s|^#\?FLANNEL_OPTIONS=.*|FLANNEL_OPTIONS=\"-iface=${IFACE} -ip-masq -docker-daemon-json=/etc/docker/daemon.json\"|" \
  /etc/sysconfig/flanneld
# flanneld masquerades traffic leaving the overlay (-ip-masq), so Docker must not masquerade too, or
# containers reach each other NATed (mk-docker-opts.sh passes --ip-masq=false for the same reason).
# flanneld adds bip and mtu to this file and keeps every other key.
if [ ! -s /etc/docker/daemon.json ]; then
    mkdir -p /etc/docker
    echo '{"ip-masq": false}' > /etc/docker/daemon.json
fi

systemctl daemon-reload
systemctl enable flanneld.service
systemctl restart flanneld.service
# Docker was started by the package before flanneld existed: restart it so it takes bip/mtu.
systemctl restart docker.service
# shellcheck source=/dev/null
. /run/flannel/subnet.env
echo "flanneld on ${IFACE}: subnet ${FLANNEL_SUBNET}, MTU ${FLANNEL_MTU}"
