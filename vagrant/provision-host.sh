#!/bin/sh
# A Docker host running flannelpy from the synced folder through the shipped systemd unit.
set -eu
ETCD_IP="$1"
MY_IP="$2"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q docker.io iptables iproute2 python3-venv
modprobe br_netfilter
echo br_netfilter > /etc/modules-load.d/flannel.conf

# The documented install (README): a venv in /opt/flannelpy made with Debian's own python3,
# /usr/bin/flanneld and flannelctl, the units, the Docker drop-in and /etc/sysconfig/flanneld.
sh /flannelpy/etc/install.sh

# The interface that holds MY_IP (eth1), never the NAT interface: every VirtualBox VM has
# 10.0.2.15 on eth0, so a default-route pick would advertise the same PublicIP from every host.
IFACE=$(ip -o -4 addr show | awk -v ip="$MY_IP" '$4 ~ "^"ip"/" {print $2; exit}')
sed -i "s|^FLANNEL_ETCD_ENDPOINTS=.*|FLANNEL_ETCD_ENDPOINTS=\"http://${ETCD_IP}:2379\"|" /etc/sysconfig/flanneld
sed -i "s|^#\?FLANNEL_OPTIONS=.*|FLANNEL_OPTIONS=\"-iface=${IFACE} -ip-masq -docker-daemon-json=/etc/docker/daemon.json\"|" \
  /etc/sysconfig/flanneld

systemctl daemon-reload
systemctl enable flanneld.service
systemctl restart flanneld.service
systemctl restart docker.service
# shellcheck source=/dev/null
. /run/flannel/subnet.env
echo "flanneld on ${IFACE}: subnet ${FLANNEL_SUBNET}, MTU ${FLANNEL_MTU}"
