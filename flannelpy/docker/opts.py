"""mk-docker-opts.sh, reproduced: subnet.env -> Docker flag env file.  Pure; flannelpy.cli.flannelctl.docker_opts acts.

Behaviour of flannel HEAD dist/mk-docker-opts.sh: getopts "f:d:icmk:?h"; the flannel env file is
sourced over the current environment; every DOCKER_OPT_* variable is written in name order; the
combined variable starts from the current value of KEY (plus a space if non-empty) and each option
is appended after a space; FLANNEL_IPMASQ is inverted for Docker; after writing, a route `via`
somewhere for our subnet is an error.

IPv6: flannel's script has no IPv6 mapping at any version (its HEAD sources FLANNEL_IPV6_SUBNET and
ignores it), so with a dual-stack subnet.env it writes exactly what it writes without one, and so
does render() by default.  Options.ipv6 is a flannelpy extension: DOCKER_OPT_IPV6="--ipv6
--fixed-cidr-v6=<FLANNEL_IPV6_SUBNET as a network>", Docker's own flags for an IPv6 docker0 whose
addresses come from our IPv6 subnet.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv6Interface
from typing import Mapping

DEFAULT_FLANNEL_ENV = "/run/flannel/subnet.env"
DEFAULT_DOCKER_ENV = "/run/docker_opts.env"
DEFAULT_KEY = "DOCKER_OPTS"

USAGE = """{prog} [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]

Generate Docker daemon options based on flannel env file
OPTIONS:
\t-f\tPath to flannel env file. Defaults to /run/flannel/subnet.env
\t-d\tPath to Docker env file to write to. Defaults to /run/docker_opts.env
\t-i\tOutput each Docker option as individual var. e.g. DOCKER_OPT_MTU=1500
\t-c\tOutput combined Docker options into DOCKER_OPTS var
\t-k\tSet the combined options key to this value (default DOCKER_OPTS=)
\t-m\tDo not output --ip-masq (useful for older Docker version)

"""


class DockerOptsError(Exception):
    """The script would print `message` to stderr and exit 1."""

    exit_code = 1


@dataclass(frozen=True)
class Options:
    flannel_env: str = DEFAULT_FLANNEL_ENV
    docker_env: str = DEFAULT_DOCKER_ENV
    indiv: bool = True
    combined: bool = True
    key: str = DEFAULT_KEY
    ipmasq: bool = True
    ipv6: bool = False  # flannelpy extension: also DOCKER_OPT_IPV6 from FLANNEL_IPV6_SUBNET (no script flag)


def ipv6_docker_opt(flannel_ipv6_subnet: str) -> str:
    """`--ipv6 --fixed-cidr-v6=fd42:0:0:1f::/64` for FLANNEL_IPV6_SUBNET=fd42:0:0:1f::1/64: Docker takes
    the bridge's IPv6 gateway (the subnet's first address, as FLANNEL_IPV6_SUBNET says) and the
    containers' addresses from fixed-cidr-v6.  DockerOptsError names a value that is no IPv6 subnet."""
    try:
        if "/" not in flannel_ipv6_subnet:
            raise ValueError
        subnet = IPv6Interface(flannel_ipv6_subnet).network
    except ValueError:
        raise DockerOptsError(f"Invalid value of FLANNEL_IPV6_SUBNET: {flannel_ipv6_subnet}\n") from None
    return f"--ipv6 --fixed-cidr-v6={subnet}"


def parse_args(argv: list[str], prog: str = "mk-docker-opts.sh") -> Options:
    """POSIX getopts with optstring "f:d:icmk:?h": clustered flags, -fFILE or -f FILE, stops at the
    first operand or `--`.  -h, -?, unknown options and missing arguments -> usage (exit 1)."""
    opts: dict = {}
    indiv = combined = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            break
        j = 1
        while j < len(arg):
            ch = arg[j]
            if ch in "fdk":
                if j + 1 < len(arg):
                    val = arg[j + 1 :]
                elif i + 1 < len(argv):
                    i += 1
                    val = argv[i]
                else:
                    raise DockerOptsError(f"{prog}: option requires an argument -- {ch}\n" + USAGE.format(prog=prog))
                opts[{"f": "flannel_env", "d": "docker_env", "k": "key"}[ch]] = val
                break
            elif ch == "i":
                indiv = True
            elif ch == "c":
                combined = True
            elif ch == "m":
                opts["ipmasq"] = False
            elif ch in "?h":
                raise DockerOptsError(USAGE.format(prog=prog))
            else:
                raise DockerOptsError(f"{prog}: illegal option -- {ch}\n" + USAGE.format(prog=prog))
            j += 1
        i += 1
    if not indiv and not combined:
        indiv = combined = True
    return Options(indiv=indiv, combined=combined, **opts)


def render(opts: Options, environ: Mapping[str, str], flannel_env: Mapping[str, str] | None) -> str:
    """The docker env file text.  `flannel_env` = parsed subnet.env, or None if the file is absent."""
    vars_ = dict(environ)
    vars_.update(flannel_env or {})
    if vars_.get("FLANNEL_SUBNET"):
        vars_["DOCKER_OPT_BIP"] = f"--bip={vars_['FLANNEL_SUBNET']}"
    if vars_.get("FLANNEL_MTU"):
        vars_["DOCKER_OPT_MTU"] = f"--mtu={vars_['FLANNEL_MTU']}"
    if opts.ipv6 and vars_.get("FLANNEL_IPV6_SUBNET"):
        vars_["DOCKER_OPT_IPV6"] = ipv6_docker_opt(vars_["FLANNEL_IPV6_SUBNET"])
    masq = vars_.get("FLANNEL_IPMASQ", "")
    if masq and opts.ipmasq:
        if masq == "true":
            vars_["DOCKER_OPT_IPMASQ"] = "--ip-masq=false"  # flannel masquerades, so Docker must not
        elif masq == "false":
            vars_["DOCKER_OPT_IPMASQ"] = "--ip-masq=true"
        else:
            raise DockerOptsError(f"Invalid value of FLANNEL_IPMASQ: {masq}\n")

    combined = vars_.get(opts.key, "")
    if combined:
        combined += " "
    lines = []
    # the script iterates `set | grep DOCKER_OPT_`: every such variable, sorted by name,
    # including ones inherited from the environment
    for name in sorted(n for n in vars_ if n.startswith("DOCKER_OPT_")):
        if opts.indiv:
            lines.append(f'{name}="{vars_[name]}"\n')
        combined += f" {vars_[name]}"
    if opts.combined:
        lines.append(f'{opts.key}="{combined}"\n')
    return "".join(lines)


def route_conflict(flannel_subnet: str, ip_route_output: str) -> str | None:
    """v0.18+ check: a route for our subnet that goes `via` a gateway means someone else routes it.

    Like the script, the subnet is FLANNEL_SUBNET with the last octet minus one (10.1.74.1/24 ->
    10.1.74.0/24), matched as a substring of `ip route show` lines containing "via".
    Returns the script's error message, or None.
    """
    if not flannel_subnet:
        return None
    try:
        addr, plen = flannel_subnet.split("/", 1)
        a, b, c, d = addr.split(".")
        subnet = f"{a}.{b}.{c}.{int(d) - 1}/{plen}"
    except ValueError:
        return None
    hits = [ln for ln in ip_route_output.splitlines() if subnet in ln and "via" in ln]
    if hits:
        return "Your routing table already contains the subnet: " + "\n".join(hits) + "\n"
    return None
