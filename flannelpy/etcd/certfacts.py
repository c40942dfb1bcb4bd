"""What a PEM certificate says about itself: validity dates and extended key usage.

Used only to name why etcd refused our client certificate: Go's TLS server answers an expired
certificate, one without clientAuth usage and one from an untrusted CA all with the same
"bad certificate" alert, so the one-line error has to be worked out from the certificate we
sent. Pure: bytes in, facts out (a small DER walk; the standard library has no X.509 parser).
"""

from __future__ import annotations

import base64
import calendar
import re
from dataclasses import dataclass

_PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.DOTALL)
_EKU_OID = bytes.fromhex("551d25")  # 2.5.29.37 extKeyUsage
_CLIENT_AUTH = bytes.fromhex("2b06010505070302")  # 1.3.6.1.5.5.7.3.2
_SERVER_AUTH = bytes.fromhex("2b06010505070301")  # 1.3.6.1.5.5.7.3.1
_ANY_EKU = bytes.fromhex("551d2500")  # 2.5.29.37.0


@dataclass(frozen=True)
class CertFacts:
    not_before: float  # Unix time
    not_after: float
    # None: the certificate has no extendedKeyUsage extension, so any usage is allowed.
    extended_key_usage: frozenset[str] | None

    def allows(self, usage: str) -> bool:
        """usage: "clientAuth" or "serverAuth"."""
        eku = self.extended_key_usage
        return eku is None or usage in eku or "any" in eku


class CertificateFormatError(ValueError):
    pass


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the DER element at pos."""
    if pos + 2 > len(data):
        raise CertificateFormatError("truncated DER")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise CertificateFormatError("bad DER length")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise CertificateFormatError("truncated DER")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        tag, vs, ve = _tlv(data, start)
        out.append((tag, vs, ve))
        start = ve
    return out


def _time(tag: int, raw: bytes) -> float:
    text = raw.decode("ascii").rstrip("Z")
    if tag == 0x17:  # UTCTime: YYMMDDHHMMSS, years 50..99 are 19xx (RFC 5280)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    y, mo, d, h, mi, s = (int(text[i:j]) for i, j in ((0, 4), (4, 6), (6, 8), (8, 10), (10, 12), (12, 14)))
    return float(calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)))


def parse_der(der: bytes) -> CertFacts:
    """Facts from one DER certificate; CertificateFormatError when it is not one."""
    try:
        _tag, cs, ce = _tlv(der, 0)
        _tbs, ts, te = _children(der, cs, ce)[0]
        fields = _children(der, ts, te)
        if fields and fields[0][0] == 0xA0:  # [0] version
            fields = fields[1:]
        # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo, then [1] [2] [3]
        _vtag, vs, ve = fields[3]
        (nb_tag, nbs, nbe), (na_tag, nas, nae) = _children(der, vs, ve)[:2]
        eku: frozenset[str] | None = None
        for tag, es, ee in fields[6:]:
            if tag != 0xA3:  # [3] extensions
                continue
            _seq, ss, se = _tlv(der, es)
            for _t, xs, xe in _children(der, ss, se):
                parts = _children(der, xs, xe)
                if der[parts[0][1]:parts[0][2]] != _EKU_OID:
                    continue
                _os, octs, _end = parts[-1]  # extnValue OCTET STRING holding SEQUENCE OF OID
                _s, us, ue = _tlv(der, octs)
                names = set()
                for _ot, os_, oe in _children(der, us, ue):
                    oid = der[os_:oe]
                    names.add({_CLIENT_AUTH: "clientAuth", _SERVER_AUTH: "serverAuth", _ANY_EKU: "any"}.get(oid, oid.hex()))
                eku = frozenset(names)
        return CertFacts(_time(nb_tag, der[nbs:nbe]), _time(na_tag, der[nas:nae]), eku)
    except (IndexError, ValueError) as exc:
        raise CertificateFormatError(f"not an X.509 certificate: {exc}") from None


def parse_pem(pem: bytes) -> CertFacts:
    """Facts of the first certificate in a PEM file (the leaf, in a chain file)."""
    m = _PEM_RE.search(pem)
    if not m:
        raise CertificateFormatError("no PEM certificate found")
    try:
        der = base64.b64decode(b"".join(m.group(1).split()), validate=True)
    except ValueError:
        raise CertificateFormatError("PEM certificate is not valid base64") from None
    return parse_der(der)
