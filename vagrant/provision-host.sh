#!/bin/sh
# A Docker host running flannelpy from the synced folder through the shipped systemd unit.
set -eu
ETCD_IP="$1"
MY_IP="$2"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q docker.io iptables iproute2 python3-pip python3-venv
modprobe br_netfilter
echo br_netfilter > /etc/modules-load.d/flannel.conf

python3 -m venv /opt/flannelpy
/opt/flannelpy/bin/pip install -q /flannelpy
ln -sf /opt/flannelpy/bin/flanneld /usr/bin/flanneld
ln -sf /opt/flannelpy/bin/flannelctl /usr/bin/flannelctl

install -m 0755 /flannelpy/systemd/flanneld-start /usr/bin/flanneld-start
install -m 0644 /flannelpy/systemd/flanneld.service /usr/lib/systemd/system/flanneld.service
install -d /usr/lib/systemd/system/docker.service.d
install -m 0644 /flannelpy/systemd/docker.service.d/flannel.conf /usr/lib/systemd/system/docker.service.d/flannel.conf
install -m 0644 /flannelpy/etc/tmpfiles-flannel.conf /usr/lib/tmpfiles.d/flannel.conf
systemd-tmpfiles --create /usr/lib/tmpfiles.d/flannel.conf
install -d /etc/sysconfig
install -m 0644 /flannelpy/etc/sysconfig/flanneld /etc/sysconfig/flanneld

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
