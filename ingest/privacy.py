"""The client address as the pipeline may keep it: an anonymised network, never the raw IP."""

from __future__ import annotations

import ipaddress


def anonymise(address: str) -> str:
    """IPv4 → its /24, IPv6 → its /48 (IPv4-mapped IPv6 is treated as IPv4); '' if unparsable."""
    try:
        ip = ipaddress.ip_address(address.strip().split("%", 1)[0])
    except ValueError:
        return ""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def client_address(remote_addr: str | None, forwarded_for: str | None, proxy_hops: int) -> str:
    """The client's address, trusting exactly ``proxy_hops`` reverse proxies in front of us.

    Each trusted proxy appends the address it saw to X-Forwarded-For, so the client is the
    ``proxy_hops``-th entry from the right; anything left of it is client-supplied and untrusted.
    """
    if proxy_hops <= 0 or not forwarded_for:
        return remote_addr or ""
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    if len(hops) < proxy_hops:
        return hops[0] if hops else (remote_addr or "")
    return hops[-proxy_hops]
