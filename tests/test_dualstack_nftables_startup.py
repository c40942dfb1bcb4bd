"""EnableIPv6 with EnableNFTables is no longer refused before the lease (issue #14): the IPv6 rules go
into nftables table flannel-ipv6, so ip6tables is needed only in iptables mode (pure, no root)."""

import json
import os
import shutil

import pytest

from flannelpy.agent import AgentOptions, check_before_lease
from flannelpy.config.flags import parse_flags
from flannelpy.config.network import parse_config
from flannelpy.errors import FlannelError

DUAL = {"Network": "10.5.0.0/16", "EnableIPv6": True, "IPv6Network": "fd42::/48", "Backend": {"Type": "vxlan"}}


def _opts(tmp_path, *argv: str) -> AgentOptions:
    return AgentOptions.from_flags(parse_flags([f"-subnet-file={tmp_path}/run/subnet.env", *argv], {}))


@pytest.mark.skipif(shutil.which("iptables") is None, reason="iptables not installed")
def test_ipv6_with_nftables_needs_no_ip6tables_and_without_it_does(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"  # iptables' IPv4 tools only
    bindir.mkdir()
    for tool in ("iptables", "iptables-save", "iptables-restore"):
        os.symlink(shutil.which(tool), bindir / tool)
    monkeypatch.setenv("PATH", str(bindir))
    opts = _opts(tmp_path)
    check_before_lease(opts, parse_config(json.dumps(DUAL | {"EnableNFTables": True})))
    with pytest.raises(FlannelError, match="^ip6tables not found in PATH"):
        check_before_lease(opts, parse_config(json.dumps(DUAL)))
    check_before_lease(_opts(tmp_path, "-ip-masq=false", "-iptables-forward-rules=false"), parse_config(json.dumps(DUAL)))
