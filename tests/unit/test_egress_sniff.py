"""The transparent proxy's naming of a connection: SNI from real ClientHellos, Host from request heads."""
from __future__ import annotations

import ssl

import pytest

from sandboxd.egress import sniff


def client_hello(server_hostname: str | None) -> bytes:
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
    out = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


def test_sni_of_a_real_client_hello_and_every_prefix_asks_for_more():
    hello = client_hello("API.Test.")
    assert sniff.destination(hello) == ("sni", "api.test")
    for cut in (1, 5, 40, len(hello) - 1):
        with pytest.raises(sniff.Incomplete):
            sniff.destination(hello[:cut])


def test_a_client_hello_split_over_two_records_is_reassembled():
    hello = client_hello("pypi.test")
    body = hello[5:]
    split = hello[:3] + (20).to_bytes(2, "big") + body[:20] + hello[:3] + (len(body) - 20).to_bytes(2, "big") + body[20:]
    assert sniff.destination(split) == ("sni", "pypi.test")


def test_tls_without_a_usable_name_names_nothing():
    assert sniff.destination(client_hello(None)) == ("sni", None)          # an IP with no SNI
    assert sniff.destination(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") == ("sni", None)  # not a ClientHello
    bad = client_hello("xx.test").replace(b"xx.test", b"x/.test")
    assert sniff.destination(bad) == ("sni", None)
    star = client_hello("aa.test").replace(b"aa.test", b"*.a.tst")   # a wildcard would match a *.suffix rule
    assert sniff.destination(star)[1] is None


def test_http_host_header_names_the_destination_without_its_port():
    assert sniff.destination(b"GET / HTTP/1.1\r\nHost: PyPI.test:8080\r\nAccept: */*\r\n\r\n") == ("host", "pypi.test")
    assert sniff.destination(b"GET / HTTP/1.1\r\nhost: [::1]:80\r\n\r\n") == ("host", "::1")
    with pytest.raises(sniff.Incomplete):
        sniff.destination(b"GET / HTTP/1.1\r\nHost: a.test")
    with pytest.raises(sniff.Incomplete):
        sniff.destination(b"GE")
    assert sniff.destination(b"GET / HTTP/1.1\r\n\r\n") == ("host", None)
    assert sniff.destination(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n") == ("host", None)


def test_anything_else_is_unknown_at_once():
    for data in (b"hello\n", b"SSH-2.0-OpenSSH_9.2\r\n", b"\x00\x01", b"HELO x\r\n", b"GET /\r\n"):
        assert sniff.destination(data) == ("unknown", None), data
    assert sniff.destination(b"A" * sniff.LIMIT) == ("unknown", None)
