#!/bin/sh
# Install flannelpy on a host with the distribution's own Python (Debian/Ubuntu, RHEL-like), or remove it.
#
#   sh etc/install.sh                 # venv in /opt/flannelpy, /usr/bin/flanneld + flannelctl, units, sysconfig
#   sh etc/install.sh --uninstall     # remove all of that again (keeps /etc/sysconfig/flanneld if edited)
#
# Why a private virtual environment: Debian 12 / Ubuntu 23.04+ mark their Python "externally managed"
# (PEP 668), so `pip install` into it is refused, and it would mix flannelpy's dependencies with the
# distribution's. A venv under /opt needs only python3-venv, keeps every dependency at the version the
# project tested, and is removed whole. The commands land where flanneld's units and scripts expect them.
#
# Options: --prefix DIR (venv, default /opt/flannelpy), --bindir DIR (command links, default /usr/bin),
# --python PATH (default: /usr/bin/python3, else python3 on PATH), --editable (develop from this tree),
# --extras LIST (e.g. test), --no-units (commands only), --uninstall. Set PIP_FIND_LINKS/PIP_NO_INDEX
# (pip's own variables) to install from a local wheelhouse on hosts without PyPI.
set -eu

src=$(cd "$(dirname "$0")/.." && pwd)
prefix=/opt/flannelpy
bindir=/usr/bin
python=
editable=
extras=
units=1
action=install

die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
        --bindir) [ $# -ge 2 ] || die "--bindir needs a directory"; bindir=$2; shift 2 ;;
        --python) [ $# -ge 2 ] || die "--python needs a path"; python=$2; shift 2 ;;
        --extras) [ $# -ge 2 ] || die "--extras needs a list such as test"; extras=$2; shift 2 ;;
        --editable) editable=1; shift ;;
        --no-units) units=; shift ;;
        --uninstall) action=uninstall; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done
case "$prefix" in /*) ;; *) die "--prefix must be an absolute path, not $prefix" ;; esac
case "$bindir" in /*) ;; *) die "--bindir must be an absolute path, not $bindir" ;; esac
[ "$(id -u)" -eq 0 ] || die "run as root (it writes $prefix, $bindir and the systemd units)"

unit_dir=/usr/lib/systemd/system
# (path in the tree, where it goes, mode)
files="systemd/flanneld-start $bindir/flanneld-start 0755
systemd/flanneld.service $unit_dir/flanneld.service 0644
systemd/docker.service.d/flannel.conf $unit_dir/docker.service.d/flannel.conf 0644
etc/tmpfiles-flannel.conf /usr/lib/tmpfiles.d/flannel.conf 0644
etc/mk-docker-opts.sh /usr/libexec/flannel/mk-docker-opts.sh 0755"

link_command() {  # refuse to replace a real flanneld binary (say, from a distribution package)
    target="$bindir/$1"
    if [ -e "$target" ] && [ ! -L "$target" ]; then
        die "$target exists and is not ours (a packaged flanneld?); remove it or pass --bindir"
    fi
    ln -sfn "$prefix/bin/$1" "$target"
}

if [ "$action" = uninstall ]; then
    # Stopped and its enablement links removed first: they would dangle once the unit file is gone.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ] && [ -f "$unit_dir/flanneld.service" ]; then
        systemctl disable --now flanneld.service || true
    fi
    for cmd in flanneld flannelctl; do
        t="$bindir/$cmd"
        if [ -L "$t" ]; then
            case "$(readlink "$t")" in "$prefix"/*) rm -f "$t" ;; esac
        fi
    done
    echo "$files" | while read -r from to mode; do
        [ -n "$from" ] || continue
        if [ -f "$to" ] && cmp -s "$src/$from" "$to"; then rm -f "$to"; fi
    done
    rmdir "$unit_dir/docker.service.d" "/usr/libexec/flannel" 2>/dev/null || true
    if [ -f "/etc/sysconfig/flanneld" ] && cmp -s "$src/etc/sysconfig/flanneld" "/etc/sysconfig/flanneld"; then
        rm -f "/etc/sysconfig/flanneld"
    elif [ -f "/etc/sysconfig/flanneld" ]; then
        echo "install.sh: kept /etc/sysconfig/flanneld (edited; remove it by hand if unwanted)"
    fi
    if [ -x "$prefix/bin/python" ]; then rm -rf "$prefix"; fi
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
    echo "install.sh: removed flannelpy from $prefix"
    exit 0
fi

if [ -z "$python" ]; then
    if [ -x /usr/bin/python3 ]; then python=/usr/bin/python3; else python=$(command -v python3 || true); fi
fi
[ -n "$python" ] || die "no python3 found; install it (Debian: apt-get install python3 python3-venv)"
[ -x "$python" ] || die "$python is not an executable Python"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$python is older than Python 3.11, which flannelpy needs"
"$python" -c 'import ensurepip, venv' 2>/dev/null ||
    die "$python has no venv module; install it (Debian/Ubuntu: apt-get install python3-venv)"

spec=$src
[ -z "$extras" ] || spec="${src}[${extras}]"
if [ ! -x "$prefix/bin/python" ]; then
    echo "install.sh: creating $prefix with $python"
    "$python" -m venv "$prefix"
fi
if [ -n "$editable" ]; then
    "$prefix/bin/python" -m pip install -q -e "$spec"
else
    "$prefix/bin/python" -m pip install -q "$spec"
fi

mkdir -p "$bindir"
link_command flanneld
link_command flannelctl

if [ -n "$units" ]; then
    echo "$files" | while read -r from to mode; do
        [ -n "$from" ] || continue
        install -D -m "$mode" "$src/$from" "$to"
    done
    if [ ! -e "/etc/sysconfig/flanneld" ]; then
        install -D -m 0644 "$src/etc/sysconfig/flanneld" "/etc/sysconfig/flanneld"
    else
        echo "install.sh: kept the existing /etc/sysconfig/flanneld"
    fi
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemd-tmpfiles --create /usr/lib/tmpfiles.d/flannel.conf || true
        systemctl daemon-reload
        # Enabled by an older unit (RequiredBy=docker.service): re-enable, so the Requires= link that restarted
        # Docker and its containers with every flanneld restart becomes the unit's Wants= link.
        if [ -L /etc/systemd/system/docker.service.requires/flanneld.service ]; then
            systemctl reenable flanneld.service
        fi
    fi
fi
echo "install.sh: flannelpy $("$prefix/bin/python" -c 'import flannelpy; print(flannelpy.__version__)' 2>/dev/null || echo '?') in $prefix; commands in $bindir${units:+; units in $unit_dir (systemctl enable --now flanneld)}"
