#!/bin/sh
# The image `vagrant up --provider=docker` boots for every machine of the Vagrantfile, as one box serves
# them all: Debian 12 with systemd as PID 1, the packages both provisioning scripts install (so they run
# without Debian's mirrors), and what a Vagrant box has: sshd, sudo, rsync, the user `vagrant` with Vagrant's
# insecure public key. Built by mmdebstrap from Debian's packages, then `docker import` (no registry).
#
#   sh docker-image.sh [IMAGE]      # default flannelpy/vagrant-debian12; DOCKER_HOST is honoured
#
# The root is kept as a tarball in /var/cache/flannelpy-lab, named by a hash of this script, so a second
# run (or another dockerd) only imports it. Needs root, mmdebstrap and docker.
set -eu
image=${1:-flannelpy/vagrant-debian12}
cache=/var/cache/flannelpy-lab
packages=systemd,systemd-sysv,dbus,iproute2,iputils-ping,procps,kmod
packages=$packages,docker.io,iptables,python3,python3-venv,busybox-static  # provision-host.sh
packages=$packages,etcd-server,etcd-client                                # provision-etcd.sh
packages=$packages,openssh-server,sudo,rsync                              # what Vagrant needs of a box

die() { echo "docker-image.sh: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap builds the root as root)"
command -v mmdebstrap >/dev/null || die "mmdebstrap not found (apt-get install mmdebstrap)"
command -v docker >/dev/null || die "docker not found (apt-get install docker.io)"
pubkey=
for k in /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
         /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub /usr/share/vagrant/keys/vagrant.pub; do
    [ -f "$k" ] && pubkey=$k && break
done
[ -n "$pubkey" ] || die "Vagrant's insecure public key (keys/vagrant.pub) not found: install vagrant"

tarball=$cache/vagrant-box-$(cat "$0" "$pubkey" | sha256sum | cut -c1-16).tar
if [ ! -f "$tarball" ]; then
    mkdir -p "$cache"
    echo "docker-image.sh: building the root with mmdebstrap (once; cached as $tarball) ..."
    part=${tarball%.tar}.part.tar  # mmdebstrap picks the output format from the name's extension
    # shellcheck disable=SC2016  # "$1" is for mmdebstrap's hooks (the root), not for this shell
    mmdebstrap --variant=minbase --include="$packages" \
        --customize-hook='chroot "$1" useradd --create-home --shell /bin/bash vagrant' \
        --customize-hook='echo "vagrant ALL=(ALL) NOPASSWD:ALL" > "$1/etc/sudoers.d/vagrant"' \
        --customize-hook='mkdir -p -m 700 "$1/home/vagrant/.ssh"' \
        --customize-hook="cp $pubkey \"\$1/home/vagrant/.ssh/authorized_keys\"" \
        --customize-hook='chroot "$1" chown -R vagrant:vagrant /home/vagrant/.ssh' \
        --customize-hook='chroot "$1" systemctl disable etcd.service' \
        bookworm "$part"
    mv "$part" "$tarball"
fi
docker import --change 'CMD ["/lib/systemd/systemd"]' "$tarball" "$image" >/dev/null
echo "docker-image.sh: $image imported from $tarball"
