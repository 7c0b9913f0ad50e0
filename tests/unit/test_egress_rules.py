"""Egress policy as data: the allowlist, the address checks, the config keys and what the planner puts in the
RunSpec. Pure logic; the proxy and the sandbox are tested in tests/integration/test_egress*.py."""
from __future__ import annotations

import ipaddress
import textwrap

import pytest

from sandboxd import config, policy
from sandboxd.egress import rules
from sandboxd.errors import ConfigError
from sandboxd.sandbox.spec import Egress, ImageSpec, RunSpec, SeccompProgram

IP = ipaddress.ip_address


@pytest.mark.parametrize("text,host,port", [
    ("pypi.org:443", "pypi.org", 443), ("PyPI.org.:443", "pypi.org", 443), ("*.example.com:8443", "*.example.com", 8443),
    ("10.0.0.1:80", "10.0.0.1", 80), ("[2001:db8::1]:443", "2001:db8::1", 443)])
def test_rules_parse(text, host, port):
    r = rules.parse_rule(text)
    assert (r.host, r.port) == (host, port)


@pytest.mark.parametrize("text", ["pypi.org", "pypi.org:0", "pypi.org:70000", "a b:80", "*:443", "[::1]x:80",
                                  "http://pypi.org:443", "pypi.org:443/x", "-bad.org:80", ":80"])
def test_bad_rules_are_refused(text):
    with pytest.raises(ValueError):
        rules.parse_rule(text)


def test_matching_is_by_name_and_port():
    allow = tuple(rules.parse_rule(t) for t in ("pypi.org:443", "*.example.com:443", "10.0.0.1:80"))
    assert rules.match(allow, "pypi.org", 443).text == "pypi.org:443"
    assert rules.match(allow, "pypi.org", 80) is None
    assert rules.match(allow, "evil-pypi.org", 443) is None
    assert rules.match(allow, "api.example.com", 443).text == "*.example.com:443"
    assert rules.match(allow, "example.com", 443) is None
    assert rules.match(allow, "badexample.com", 443) is None
    assert rules.match(allow, "10.0.0.1", 80) is not None


@pytest.mark.parametrize("addr,why", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("10.1.2.3", "private"),
    ("192.168.0.1", "private"), ("172.16.0.1", "private"), ("fd00::1", "private"), ("100.64.0.1", "not-global"),
    ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved"),
    ("93.184.216.34", None), ("2606:4700::1", None)])
def test_address_refusal(addr, why):
    assert rules.address_refusal(IP(addr), ()) == why


def test_networks_open_ranges_on_purpose_and_nothing_more():
    nets = (rules.parse_network("10.213.0.0/16"),)
    assert rules.address_refusal(IP("10.213.4.2"), nets) is None
    assert rules.address_refusal(IP("10.214.4.2"), nets) == "private"
    assert rules.address_refusal(IP("169.254.169.254"), nets) == "link-local"


POLICY = """
[[policies]]
name = "agents"
principals = ["*"]
"""


def _parse(extra: str) -> config.Config:
    return config.parse(textwrap.dedent(POLICY + extra), "/x.toml")


def test_network_defaults_to_none():
    p = _parse("").identity.policies[0]
    assert (p.network, p.egress) == ("none", None)


def test_egress_policy_parses_into_the_spec_egress():
    p = _parse('network = "egress"\negress_allow = ["pypi.org:443"]\negress_allow_networks = ["10.0.0.0/8"]\n'
               'egress_max_connections = 2\negress_max_bytes_in = "1MiB"\negress_max_connection_time = "5s"\n'
               ).identity.policies[0]
    assert p.egress == Egress(policy="agents", allow=("pypi.org:443",), networks=("10.0.0.0/8",), max_connections=2,
                              max_bytes_in=1 << 20, max_connection_time=5.0)
    assert p.egress.transparent and p.egress.transparent_port == 3129
    assert not _parse('network = "egress"\negress_transparent = false').identity.policies[0].egress.transparent


@pytest.mark.parametrize("extra,message", [
    ("network = true", "policies[0].network: expected a string"),
    ('network = "open"', 'policies[0].network: expected "none" or "egress"'),
    ('egress_allow = ["pypi.org:443"]', 'policies[0].egress_allow: only meaningful with network = "egress"'),
    ('network = "egress"\negress_allow = ["pypi.org"]', "policies[0].egress_allow: 'pypi.org': expected host:port"),
    ('network = "egress"\negress_allow_networks = ["10.0.0.0/33"]', "policies[0].egress_allow_networks:"),
    ('network = "egress"\negress_max_connections = 0', "egress_max_connections: expected at least 1"),
    ('network = "egress"\negress_transparent = "yes"', "policies[0].egress_transparent: expected true or false"),
    ('egress_transparent = true', 'policies[0].egress_transparent: only meaningful with network = "egress"'),
])
def test_bad_egress_policies_are_refused(extra, message):
    with pytest.raises(ConfigError) as info:
        _parse(extra)
    assert message in str(info.value)


def test_egress_resolver_section():
    cfg = config.parse('[egress]\nresolver = "static"\n[egress.hosts]\n"Api.Test" = ["10.0.0.2", "::1"]\n', "/x")
    assert cfg.egress == config.EgressConfig("static", (("api.test", ("10.0.0.2", "::1")),))
    with pytest.raises(ConfigError, match="egress.hosts.x: expected an IP address"):
        config.parse('[egress.hosts]\nx = "not-an-ip"\n', "/x")
    with pytest.raises(ConfigError, match="egress.resolver"):
        config.parse('[egress]\nresolver = "dns"\n', "/x")


def test_proxy_env_points_at_the_runs_listener_and_the_spec_round_trips():
    egress = Egress(policy="agents", allow=("pypi.org:443",), port=3128)
    env = policy.proxy_env(egress)
    assert env["HTTP_PROXY"] == env["https_proxy"] == "http://127.0.0.1:3128"
    assert env["NO_PROXY"] == "localhost,127.0.0.1,::1"
    spec = RunSpec(run_id="r", argv=("/bin/true",), env=tuple(sorted(env.items())), image=ImageSpec("host", "/"),
                   seccomp=SeccompProgram("default", "00" * 32, b""), network="egress", egress=egress)
    assert RunSpec.from_json(spec.to_json()) == spec


def test_nftables_refusals_carry_nfts_own_message():
    """The egress_redirect step fails with nft's words (a syntax error touches no ruleset)."""
    from sandboxd.sandbox import egress
    try:
        egress.nft("")
    except RuntimeError as e:
        pytest.skip(str(e))
    with pytest.raises(RuntimeError, match="nftables: Error: syntax error"):
        egress.nft("table inet sandboxd_test { chain c { bogus } }")
