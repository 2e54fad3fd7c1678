"""Tests of DNS: the built-in authoritative responder (DnsZone, DnsResponder
in pipe2me_server.py), its wiring into a running server (DNS_PORT, records
from the store, split horizon, the SOA serial) and the reachability check.

Unit tests feed DnsZone hand-built packets and read responses with a small
parser written here (independent of the code under test); end-to-end tests
run DnsResponder on 127.0.0.1 on the server's EventLoop in a thread, or the
whole server with --dns-port, and query them with the real `dig` (Debian's
dnsutils) and raw sockets. The attacks on the responder (floods, slow TCP
clients, forged client subnets) are in tests/test_dns_abuse.py.
"""

import json
import os
import random
import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest

from conftest import SERVER, ServerHandle, load_script, setup_pod, wait_until
from helpers import request, request_json

srv = load_script(SERVER, "pipe2me_server")

A, NS, SOA, HINFO, MX, TXT, AAAA, OPT, AXFR, ANY = 1, 2, 6, 13, 15, 16, 28, 41, 252, 255
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
QR, AA, TC, RD = 0x8000, 0x0400, 0x0200, 0x0100

DOMAIN = "pipe2.localhost"
OTTER = "calm-teal-otter.pipe2.localhost"
FOX = "quiet-red-fox.pipe2.localhost"
LOOPY = "loopy-blue-owl.pipe2.localhost"
MANY = "many.pipe2.localhost"
ACME = "_acme-challenge." + OTTER
ROUTER_IP = "203.0.113.7"
MANY_TEXTS = ["%02d-" % i + "x" * 57 for i in range(40)]


# ---- helpers: building queries, reading responses --------------------------

def encode_name(name):
    labels = [label.encode("ascii") for label in name.rstrip(".").split(".") if label]
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


def opt_record(udp_bytes=1232, version=0, do=False, options=b""):
    ttl = version << 16 | (0x8000 if do else 0)
    return b"\0" + struct.pack("!HHIH", OPT, udp_bytes, ttl, len(options)) + options


def ecs_option(address, source, family=1, scope=0):
    body = struct.pack("!HBB", family, source, scope) + address
    return struct.pack("!HH", 8, len(body)) + body


def frame(message):
    """A message behind its DNS-over-TCP length prefix."""
    return struct.pack("!H", len(message)) + message


def make_query(name, qtype=A, qid=0x1234, flags=RD, opt=None, qclass=1):
    header = struct.pack("!6H", qid, flags, 1, 0, 0, 1 if opt else 0)
    return header + encode_name(name) + struct.pack("!HH", qtype, qclass) + (opt or b"")


def read_name(data, offset):
    """Return (dotted name, offset after it); follows at most 64 pointers."""
    labels, end = [], None
    for _ in range(64):
        length = data[offset]
        if length >= 0xC0:
            end = offset + 2 if end is None else end
            offset = (length & 0x3F) << 8 | data[offset + 1]
            continue
        if length == 0:
            return ".".join(labels), (offset + 1 if end is None else end)
        labels.append(data[offset + 1:offset + 1 + length].decode("latin-1"))
        offset += 1 + length
    raise AssertionError("too many pointers in a response name")


def parse(data):
    """Return a dict of a response: id, flags, rcode, question, sections."""
    qid, flags, qd, an, ns, ar = struct.unpack_from("!6H", data)
    offset, out = 12, {"id": qid, "flags": flags, "rcode": flags & 0xF, "question": []}
    for _ in range(qd):
        name, offset = read_name(data, offset)
        out["question"].append((name,) + struct.unpack_from("!HH", data, offset))
        offset += 4
    for section, count in (("answer", an), ("authority", ns), ("additional", ar)):
        out[section] = []
        for _ in range(count):
            name, offset = read_name(data, offset)
            rtype, rclass, ttl, rdlength = struct.unpack_from("!HHIH", data, offset)
            offset += 10
            out[section].append({"name": name, "type": rtype, "class": rclass, "ttl": ttl,
                                 "rdata": data[offset:offset + rdlength], "at": offset})
            offset += rdlength
    assert offset == len(data), "response has trailing bytes"
    return out


def rdata_addresses(records, rtype):
    family = socket.AF_INET if rtype == A else socket.AF_INET6
    return sorted(socket.inet_ntop(family, r["rdata"]) for r in records if r["type"] == rtype)


def txt_strings(rdata):
    strings, offset = [], 0
    while offset < len(rdata):
        strings.append(rdata[offset + 1:offset + 1 + rdata[offset]])
        offset += 1 + rdata[offset]
    return strings


def opt_of(response):
    opts = [r for r in response["additional"] if r["type"] == OPT]
    assert len(opts) <= 1
    return opts[0] if opts else None


def make_zone(**overrides):
    tunnels = {
        OTTER: srv.DnsTunnelRecord(["198.51.100.10"], ["2001:db8::10"],
                                   {ROUTER_IP: ["192.168.1.20"]}),
        FOX: srv.DnsTunnelRecord(["198.51.100.11"], [], None),
        LOOPY: srv.DnsTunnelRecord(["198.51.100.12"], [], {"127.0.0.1": ["192.168.7.7"]}),
    }
    texts = {ACME: ["acme-token-value"], MANY: MANY_TEXTS,
             "long." + DOMAIN: ["y" * 600]}
    settings = dict(domain=DOMAIN, server_ipv4=["127.0.0.1"], server_ipv6=["::1"], ttl_s=60,
                    lookup=tunnels.get, txt_lookup=lambda name: texts.get(name, []))
    settings.update(overrides)
    return srv.DnsZone(**settings)


def raw_answer(zone, name, qtype):
    return zone.answer(make_query(name, qtype), "192.0.2.1", 1232)


def ask(zone, packet, client_ip="192.0.2.1", max_udp=1232):
    response = zone.answer(packet, client_ip, max_udp)
    assert response is not None
    return parse(response)


# ---- unit tests: answers ----------------------------------------------------

def test_dns_apex_answers_soa_ns_and_server_addresses():
    zone = make_zone(serial=7)
    soa = ask(zone, make_query(DOMAIN, SOA))
    assert soa["flags"] & (QR | AA) == QR | AA and soa["rcode"] == NOERROR
    assert soa["flags"] & RD  # copied from the query
    (record,) = soa["answer"]
    raw = raw_answer(zone, DOMAIN, SOA)
    mname, offset = read_name(raw, record["at"])
    assert (mname, read_name(raw, offset)[0]) == ("ns." + DOMAIN, "hostmaster." + DOMAIN)
    ns = ask(zone, make_query(DOMAIN, NS))
    assert [read_name(raw_answer(zone, DOMAIN, NS), r["at"])[0] for r in ns["answer"]] \
        == ["ns." + DOMAIN]
    assert rdata_addresses(ns["additional"], A) == ["127.0.0.1"]  # glue
    assert rdata_addresses(ask(zone, make_query(DOMAIN, A))["answer"], A) == ["127.0.0.1"]
    assert rdata_addresses(ask(zone, make_query(DOMAIN, AAAA))["answer"], AAAA) == ["::1"]
    assert rdata_addresses(ask(zone, make_query("ns." + DOMAIN, A))["answer"], A) == ["127.0.0.1"]


def test_dns_soa_serial_follows_attribute():
    zone = make_zone(serial=41)
    def serial_at():
        raw = raw_answer(zone, DOMAIN, SOA)  # SOA is the last record: serial + 4 timers
        return struct.unpack_from("!I", raw, len(raw) - 20)[0]
    assert serial_at() == 41
    zone.serial += 1
    assert serial_at() == 42
    zone.serial = 2 ** 32 + 5  # serials wrap (RFC 1982)
    assert serial_at() == 5


def test_dns_tunnel_a_and_aaaa():
    zone = make_zone()
    response = ask(zone, make_query(OTTER, A))
    assert response["flags"] & AA and response["rcode"] == NOERROR
    assert rdata_addresses(response["answer"], A) == ["198.51.100.10"]
    assert response["answer"][0]["ttl"] == 60
    assert rdata_addresses(ask(zone, make_query(OTTER, AAAA))["answer"], AAAA) == ["2001:db8::10"]


def test_dns_unknown_name_nxdomain_with_soa():
    zone = make_zone()
    for name in ("nobody-here.pipe2.localhost", "www." + OTTER, "a.b.c." + DOMAIN):
        response = ask(zone, make_query(name, A))
        assert response["rcode"] == NXDOMAIN and response["flags"] & AA
        assert response["answer"] == []
        assert [r["type"] for r in response["authority"]] == [SOA]
        assert response["authority"][0]["name"] == DOMAIN


def test_dns_name_with_odd_bytes_is_nxdomain_without_lookup():
    seen = []
    zone = make_zone(lookup=lambda name: seen.append(name), txt_lookup=lambda n: seen.append(n))
    packet = make_query("x." + DOMAIN).replace(b"\x01x", b"\x03a.b")
    assert ask(zone, packet)["rcode"] == NXDOMAIN
    assert seen == []


def test_dns_existing_name_without_type_is_nodata_with_soa():
    zone = make_zone()
    for name, qtype in ((FOX, AAAA), (OTTER, MX), (OTTER, TXT), (ACME, A), (DOMAIN, TXT)):
        response = ask(zone, make_query(name, qtype))
        assert response["rcode"] == NOERROR and response["flags"] & AA, (name, qtype)
        assert response["answer"] == []
        assert [r["type"] for r in response["authority"]] == [SOA]


def test_dns_outside_domain_refused():
    zone = make_zone()
    for name in ("example.com", "localhost", "", "xpipe2.localhost", "pipe2.localhost.evil"):
        response = ask(zone, make_query(name, A))
        assert response["rcode"] == REFUSED, name
        assert not response["flags"] & AA
        assert response["answer"] == response["authority"] == []
    assert ask(zone, make_query(DOMAIN, A, qclass=3))["rcode"] == REFUSED  # CHAOS
    assert ask(zone, make_query(DOMAIN, AXFR))["rcode"] == REFUSED


def test_dns_names_case_insensitive_question_echoed_as_asked():
    zone = make_zone()
    asked = "CaLm-TeAl-OtTeR.PiPe2.LocalHost"
    raw = zone.answer(make_query(asked, A), "192.0.2.1", 1232)
    response = parse(raw)
    assert response["question"] == [(asked, A, 1)]
    assert rdata_addresses(response["answer"], A) == ["198.51.100.10"]
    assert encode_name(asked) in raw


def test_dns_txt_records_for_acme():
    zone = make_zone()
    response = ask(zone, make_query(ACME, TXT))
    assert response["flags"] & AA and response["rcode"] == NOERROR
    assert [txt_strings(r["rdata"]) for r in response["answer"]] == [[b"acme-token-value"]]
    long_txt = ask(zone, make_query("long." + DOMAIN, TXT, opt=opt_record()))["answer"][0]["rdata"]
    assert [len(s) for s in txt_strings(long_txt)] == [255, 255, 90]


def test_dns_any_answers_addresses_or_hinfo():
    zone = make_zone()
    response = ask(zone, make_query(OTTER, ANY))
    assert sorted(r["type"] for r in response["answer"]) == [A, AAAA]
    hinfo = ask(zone, make_query(ACME, ANY))["answer"]
    assert [(r["type"], r["rdata"]) for r in hinfo] == [(HINFO, b"\x07RFC8482\x00")]
    assert ask(zone, make_query("nobody." + DOMAIN, ANY))["rcode"] == NXDOMAIN


def test_dns_split_horizon_by_client_address():
    zone = make_zone()
    assert rdata_addresses(ask(zone, make_query(OTTER), ROUTER_IP)["answer"], A) \
        == ["192.168.1.20"]
    mapped = ask(zone, make_query(OTTER), "::ffff:" + ROUTER_IP)
    assert rdata_addresses(mapped["answer"], A) == ["192.168.1.20"]
    assert rdata_addresses(ask(zone, make_query(OTTER), "203.0.113.8")["answer"], A) \
        == ["198.51.100.10"]
    # AAAA is never split
    assert rdata_addresses(ask(zone, make_query(OTTER, AAAA), ROUTER_IP)["answer"], AAAA) \
        == ["2001:db8::10"]


def test_dns_split_horizon_by_client_subnet_with_scope_echo():
    zone = make_zone(subnet_resolvers=["192.0.2.0/24"])  # ask() asks from 192.0.2.1
    full = opt_record(options=ecs_option(socket.inet_aton(ROUTER_IP), 32))
    response = ask(zone, make_query(OTTER, opt=full))
    assert rdata_addresses(response["answer"], A) == ["192.168.1.20"]
    echo = opt_of(response)["rdata"]
    assert echo == ecs_option(socket.inet_aton(ROUTER_IP), 32, scope=32)
    partial = opt_record(options=ecs_option(bytes([203, 0, 113]), 24))
    response = ask(zone, make_query(OTTER, opt=partial))
    assert rdata_addresses(response["answer"], A) == ["198.51.100.10"]
    assert opt_of(response)["rdata"] == ecs_option(bytes([203, 0, 113]), 24, scope=32)
    # a name whose answer does not depend on the client is scoped /0
    response = ask(zone, make_query(FOX, opt=full))
    assert opt_of(response)["rdata"] == ecs_option(socket.inet_aton(ROUTER_IP), 32, scope=0)


def test_dns_edns_opt_echoed_with_our_size_and_do_bit():
    zone = make_zone()
    response = ask(zone, make_query(OTTER, opt=opt_record(4096, do=True)))
    opt = opt_of(response)
    assert opt["name"] == "" and opt["class"] == 1232 and opt["ttl"] == 0x8000
    assert opt_of(ask(zone, make_query(OTTER))) is None


def test_dns_edns_version_1_gets_badvers():
    zone = make_zone()
    response = ask(zone, make_query(OTTER, opt=opt_record(version=1)))
    assert response["rcode"] == 0 and response["answer"] == []
    assert opt_of(response)["ttl"] >> 24 == 1  # extended rcode 16 = BADVERS


def test_dns_udp_truncation_limits():
    zone = make_zone()
    plain = ask(zone, make_query(MANY, TXT))
    assert plain["flags"] & TC and plain["answer"] == []
    assert plain["question"] == [(MANY, TXT, 1)]
    for client_size in (512, 4096):  # 4096 is capped at our 1232
        response = ask(zone, make_query(MANY, TXT, opt=opt_record(client_size)))
        assert response["flags"] & TC and response["answer"] == [] and opt_of(response)
    raw = zone.answer(make_query(MANY, TXT, opt=opt_record(4096)), "192.0.2.1", None)
    over_tcp = parse(raw)
    assert not over_tcp["flags"] & TC and len(over_tcp["answer"]) == 40
    assert len(raw) > 1232
    small = zone.answer(make_query(OTTER, TXT), "192.0.2.1", 1232)
    assert len(small) <= 512 and not parse(small)["flags"] & TC


def test_dns_tcp_answers_capped_at_65535_bytes():
    texts = ["z" * 4000] * 20
    zone = make_zone(txt_lookup=lambda name: texts)
    raw = zone.answer(make_query(MANY, TXT), "192.0.2.1", None)
    assert parse(raw)["flags"] & TC and len(raw) <= 65535


def test_dns_opcode_other_than_query_notimp():
    zone = make_zone()
    for opcode in (1, 2, 4, 5, 15):
        packet = make_query(OTTER, flags=opcode << 11)
        response = ask(zone, packet)
        assert response["rcode"] == NOTIMP and (response["flags"] >> 11) & 0xF == opcode


def test_dns_responses_and_short_packets_dropped():
    zone = make_zone()
    assert zone.answer(make_query(OTTER, flags=QR), "192.0.2.1", 1232) is None
    for length in range(12):
        assert zone.answer(make_query(OTTER)[:length], "192.0.2.1", 1232) is None


def formerr(zone, packet):
    response = zone.answer(packet, "192.0.2.1", 1232)
    assert response is not None
    parsed = parse(response)
    assert parsed["rcode"] == FORMERR and parsed["flags"] & QR
    assert parsed["id"] == struct.unpack_from("!H", packet)[0]
    return parsed


def test_dns_question_count_not_one_formerr():
    zone = make_zone()
    question = encode_name(OTTER) + struct.pack("!HH", A, 1)
    for count in (0, 2, 100):
        formerr(zone, struct.pack("!6H", 7, 0, count, 0, 0, 0) + question * count)


def test_dns_truncated_query_formerr():
    zone = make_zone()
    packet = make_query(OTTER, opt=opt_record(options=ecs_option(b"\xcb\x00\x71", 24)))
    for length in range(12, len(packet)):
        formerr(zone, packet[:length])
    assert ask(zone, packet)["rcode"] == NOERROR


def test_dns_compression_loops_and_forward_pointers_formerr():
    zone = make_zone()
    header = struct.pack("!6H", 9, 0, 1, 0, 0, 0)
    tail = struct.pack("!HH", A, 1)
    formerr(zone, header + b"\xc0\x0c" + tail)                   # points at itself
    formerr(zone, header + b"\x01a\xc0\x0c" + tail)              # back to its own start
    formerr(zone, header + b"\xc0\x10" + tail + b"\x01a\x00")    # forward
    formerr(zone, header + b"\x80\x01a\x00" + tail)              # reserved label type
    formerr(zone, header + b"\xc0")                               # truncated pointer


def test_dns_pointer_rule_refuses_loops_before_the_length_limit():
    looping = struct.pack("!6H", 9, 0, 1, 0, 0, 0) + b"\x01a\x01b\xc0\x0e"
    with pytest.raises(srv.DnsFormatError, match="loops"):
        srv.read_name(looping, 12)
    assert srv.read_name(looping[:-2] + b"\x00", 12) == ([b"a", b"b"], 17)


def test_dns_legitimate_compression_in_query_accepted():
    zone = make_zone()
    header = struct.pack("!6H", 9, 0, 1, 1, 0, 0)
    question = encode_name(OTTER) + struct.pack("!HH", A, 1)
    answer = b"\xc0\x0c" + struct.pack("!HHIH", A, 1, 60, 4) + b"\x01\x02\x03\x04"
    response = ask(zone, header + question + answer)
    assert response["rcode"] == NOERROR and rdata_addresses(response["answer"], A)


def test_dns_label_and_name_length_limits_formerr():
    zone = make_zone()
    header = struct.pack("!6H", 3, 0, 1, 0, 0, 0)
    tail = struct.pack("!HH", A, 1)
    formerr(zone, header + b"\x40" + b"a" * 64 + b"\x00" + tail)
    ok_name = (b"\x3f" + b"a" * 63) * 3 + b"\x3d" + b"a" * 61 + b"\x00"  # 255 bytes
    assert len(ok_name) == 255
    assert ask(zone, header + ok_name + tail)["rcode"] == REFUSED
    long_name = (b"\x3f" + b"a" * 63) * 3 + b"\x3e" + b"a" * 62 + b"\x00"  # 256 bytes
    formerr(zone, header + long_name + tail)


def test_dns_bad_edns_formerr():
    zone = make_zone()
    question = make_query(OTTER)[12:]
    formerr(zone, struct.pack("!6H", 1, 0, 1, 0, 0, 2) + question + opt_record() * 2)
    bad_owner = struct.pack("!6H", 1, 0, 1, 0, 0, 1) + make_query(OTTER)[12:] \
        + b"\x01a\x00" + opt_record()[1:]
    formerr(zone, bad_owner)
    for option in (ecs_option(b"\xcb\x00\x71\x07", 24),           # too many address bytes
                   ecs_option(b"\xcb\x00\x71", 20),               # bits beyond the prefix
                   ecs_option(b"\xcb\x00\x71", 24, scope=24),     # scope set in a query
                   ecs_option(b"\xcb", 8, family=9),              # unknown family
                   ecs_option(b"\xcb" * 5, 33),                   # prefix too long
                   ecs_option(b"\xcb", 8) * 2,                    # two subnet options
                   struct.pack("!HH", 10, 8) + b"abc"):           # truncated option
        formerr(zone, make_query(OTTER, opt=opt_record(options=option)))
    assert ask(zone, make_query(OTTER, opt=opt_record(options=struct.pack("!HH", 10, 8) + b"12345678")))[
        "rcode"] == NOERROR  # unknown options (cookies) are ignored


def test_dns_opt_in_question_formerr():
    formerr(make_zone(), make_query(DOMAIN, OPT))


def test_dns_random_and_mutated_packets_never_raise():
    zone = make_zone()
    rng = random.Random(20240501)
    seeds = [make_query(OTTER), make_query(MANY, TXT, opt=opt_record()),
             make_query(OTTER, opt=opt_record(options=ecs_option(b"\xcb\x00\x71\x07", 32)))]
    for _ in range(4000):
        kind = rng.randrange(3)
        if kind == 0:
            packet = bytes(rng.randrange(256) for _ in range(rng.randrange(80)))
        else:
            packet = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 6)):
                packet[rng.randrange(len(packet))] = rng.randrange(256)
            packet = bytes(packet[:rng.randrange(len(packet) + 1)] if kind == 2 else packet)
        response = zone.answer(packet, "192.0.2.1", 1232)
        if response is None:
            assert len(packet) < 12 or packet[2] & 0x80
            continue
        parsed = parse(response)
        assert parsed["flags"] & QR and parsed["id"] == struct.unpack_from("!H", packet)[0]
        assert parsed["rcode"] in (NOERROR, FORMERR, NXDOMAIN, NOTIMP, REFUSED)
        assert len(response) <= 1232


def test_dns_zone_refuses_bad_settings():
    with pytest.raises(ValueError):
        make_zone(server_ipv4=["not-an-address"])
    with pytest.raises(ValueError):
        make_zone(domain="a..b")


def test_dns_bad_addresses_from_lookup_skipped():
    zone = make_zone(lookup=lambda name: srv.DnsTunnelRecord(["bogus", "198.51.100.9"], ["1.2.3.4"], None))
    assert rdata_addresses(ask(zone, make_query(OTTER))["answer"], A) == ["198.51.100.9"]
    assert ask(zone, make_query(OTTER, AAAA))["answer"] == []


# ---- end to end: DnsServer in a thread, queried with dig and raw sockets --------

@pytest.fixture
def dns_server():
    """A DnsResponder on 127.0.0.1 with make_zone() (client subnets honoured
    from 127.0.0.1), on an EventLoop run by a thread."""
    loop = srv.EventLoop()
    server = srv.DnsResponder(make_zone(subnet_resolvers=["127.0.0.1"]), loop, "127.0.0.1", 0)
    errors = []

    def run():
        try:
            loop.run()
        except BaseException as error:  # surfaced by the fixture's teardown
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield server
    loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(server.close)
    loop.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert errors == []


needs_dig = pytest.mark.skipif(shutil.which("dig") is None and not os.environ.get("CI"),
                               reason="dig (dnsutils) not installed")


def dig(server, *args):
    """Run dig against the server; return (status, flags, sections, stdout)."""
    argv = ["dig", "@127.0.0.1", "-p", str(server.port), "+norec", "+time=2", "+tries=1"]
    run = subprocess.run(argv + list(args), capture_output=True, text=True, timeout=30)
    out = run.stdout
    status = re.search(r"status: (\w+)", out)
    flags = re.search(r";; flags: ([a-z ]*);", out)
    sections = {}
    for name in ("ANSWER", "AUTHORITY", "ADDITIONAL"):
        block = re.search(r";; %s SECTION:\n(.*?)(?:\n\n|\Z)" % name, out, re.S)
        sections[name] = [line.split() for line in block.group(1).splitlines()] if block else []
    return (status.group(1) if status else None,
            set(flags.group(1).split()) if flags else set(), sections, out)


@needs_dig
def test_dns_dig_apex_soa_authoritative(dns_server):
    status, flags, sections, out = dig(dns_server, DOMAIN, "SOA")
    assert status == "NOERROR" and {"qr", "aa"} <= flags and "ra" not in flags, out
    (soa,) = sections["ANSWER"]
    assert soa[3] == "SOA" and soa[4] == "ns.%s." % DOMAIN and soa[5] == "hostmaster.%s." % DOMAIN
    status, flags, sections, out = dig(dns_server, DOMAIN, "NS")
    assert [r[4] for r in sections["ANSWER"]] == ["ns.%s." % DOMAIN], out


@needs_dig
def test_dns_dig_tunnel_a_udp_and_tcp(dns_server):
    for extra in ([], ["+tcp"], ["+noedns"]):
        status, flags, sections, out = dig(dns_server, OTTER, "A", *extra)
        assert status == "NOERROR" and "aa" in flags, out
        assert [r[4] for r in sections["ANSWER"]] == ["198.51.100.10"], out
        assert ("OPT PSEUDOSECTION" in out) == (extra != ["+noedns"]), out
    status, flags, sections, out = dig(dns_server, OTTER, "AAAA", "+tcp")
    assert [r[4] for r in sections["ANSWER"]] == ["2001:db8::10"], out


@needs_dig
def test_dns_dig_nxdomain_and_nodata_carry_soa(dns_server):
    status, flags, sections, out = dig(dns_server, "nobody." + DOMAIN, "A")
    assert status == "NXDOMAIN" and "aa" in flags and sections["ANSWER"] == [], out
    assert [r[3] for r in sections["AUTHORITY"]] == ["SOA"], out
    status, flags, sections, out = dig(dns_server, FOX, "AAAA")
    assert status == "NOERROR" and sections["ANSWER"] == [], out
    assert [r[3] for r in sections["AUTHORITY"]] == ["SOA"], out


@needs_dig
def test_dns_dig_outside_domain_refused(dns_server):
    for name in ("example.com", "localhost", "."):
        status, flags, sections, out = dig(dns_server, name, "A")
        assert status == "REFUSED" and "aa" not in flags, out


@needs_dig
def test_dns_dig_many_txt_truncated_then_tcp_retry(dns_server):
    for extra in (["+bufsize=512"], ["+noedns"], []):
        status, flags, sections, out = dig(dns_server, MANY, "TXT", "+ignore", *extra)
        assert status == "NOERROR" and "tc" in flags and sections["ANSWER"] == [], out
        status, flags, sections, out = dig(dns_server, MANY, "TXT", *extra)
        assert "Truncated, retrying in TCP mode" in out, out
        assert status == "NOERROR" and "tc" not in flags and len(sections["ANSWER"]) == 40, out
    status, flags, sections, out = dig(dns_server, ACME, "TXT", "+bufsize=512")
    assert [r[4] for r in sections["ANSWER"]] == ['"acme-token-value"'], out


@needs_dig
def test_dns_dig_split_horizon_via_subnet(dns_server):
    status, flags, sections, out = dig(dns_server, OTTER, "A", "+subnet=%s/32" % ROUTER_IP)
    assert [r[4] for r in sections["ANSWER"]] == ["192.168.1.20"], out
    assert "CLIENT-SUBNET: %s/32/32" % ROUTER_IP in out, out
    for subnet in ("203.0.113.8/32", "203.0.113.0/24"):
        status, flags, sections, out = dig(dns_server, OTTER, "A", "+subnet=" + subnet)
        assert [r[4] for r in sections["ANSWER"]] == ["198.51.100.10"], out
    # the query's source address itself (127.0.0.1 is a split key of LOOPY)
    status, flags, sections, out = dig(dns_server, LOOPY, "A")
    assert [r[4] for r in sections["ANSWER"]] == ["192.168.7.7"], out


def udp_exchange(sock, packet, probe_id):
    """Send packet then a probe query; return responses received before the
    probe's answer (which must come)."""
    sock.send(packet)
    sock.send(make_query(FOX, qid=probe_id))
    before = []
    for _ in range(8):
        response = sock.recv(65535)
        if parse(response)["id"] == probe_id and parse(response)["question"] == [(FOX, A, 1)]:
            return before
        before.append(response)
    raise AssertionError("probe query never answered")


def test_dns_server_survives_malformed_datagrams(dns_server):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", dns_server.port))
    header = struct.pack("!6H", 0xBEEF, 0, 1, 0, 0, 0)
    question = encode_name(OTTER) + struct.pack("!HH", A, 1)
    cases = [make_query(OTTER)[:20], header + b"\xc0\x0c\x00\x01\x00\x01",
             struct.pack("!6H", 0xBEEF, 0, 0, 0, 0, 0),
             struct.pack("!6H", 0xBEEF, 0, 100, 0, 0, 0) + question * 100]
    for packet in cases:
        (response,) = udp_exchange(sock, packet, 1)
        assert parse(response)["rcode"] == FORMERR
        assert parse(response)["id"] == struct.unpack_from("!H", packet)[0]
    rng = random.Random(7)
    for index in range(2000):
        packet = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))
        for response in udp_exchange(sock, packet, 2 + index % 60000):
            assert parse(response)["id"] == struct.unpack_from("!H", packet)[0]
    response = parse(_ask_udp(sock, make_query(OTTER, qid=77)))
    assert response["id"] == 77 and rdata_addresses(response["answer"], A) == ["198.51.100.10"]
    sock.close()


def _ask_udp(sock, packet):
    sock.send(packet)
    return sock.recv(65535)


def tcp_connect(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    return sock


def recv_exact(sock, count):
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise AssertionError("connection closed after %d of %d bytes" % (len(data), count))
        data += chunk
    return data


def tcp_ask(sock, packet):
    sock.sendall(frame(packet))
    (length,) = struct.unpack("!H", recv_exact(sock, 2))
    return parse(recv_exact(sock, length))


def wait_closed(sock):
    """Return True once the server closed the connection (EOF or reset)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_dns_tcp_pipelined_queries_and_garbage(dns_server):
    sock = tcp_connect(dns_server)
    sock.sendall(frame(make_query(OTTER, qid=1)) + frame(make_query(FOX, qid=2)))
    ids = []
    for _ in range(2):
        (length,) = struct.unpack("!H", recv_exact(sock, 2))
        ids.append(parse(recv_exact(sock, length))["id"])
    assert ids == [1, 2]
    garbage = struct.pack("!6H", 9, 0, 1, 0, 0, 0) + b"\x3fabc"  # truncated label
    assert tcp_ask(sock, garbage)["rcode"] == FORMERR
    assert tcp_ask(sock, make_query(MANY, TXT))["answer"]
    sock.sendall(b"\x00\x05hello")  # shorter than a header: the connection is dropped
    assert wait_closed(sock)
    sock.close()
    sock = tcp_connect(dns_server)
    assert tcp_ask(sock, make_query(OTTER))["rcode"] == NOERROR
    sock.close()


def test_dns_tcp_idle_connections_expire(dns_server):
    dns_server.TCP_QUERY_DEADLINE_S = 0.3
    sock = tcp_connect(dns_server)
    assert tcp_ask(sock, make_query(OTTER))["rcode"] == NOERROR
    started = time.monotonic()
    assert wait_closed(sock)
    assert time.monotonic() - started < 4.5
    sock.close()


def test_dns_tcp_client_limit(dns_server):
    """At most `cap` connections at once: one more from the source holding
    them all is closed; one from another source takes the place of the
    oldest; a freed slot is used again."""
    dns_server.shares.cap, dns_server.shares.share = 4, 0
    socks = [tcp_connect(dns_server) for _ in range(4)]
    for sock in socks:  # each one accepted and served
        assert tcp_ask(sock, make_query(OTTER))["rcode"] == NOERROR
    extra = tcp_connect(dns_server)
    assert wait_closed(extra)
    extra.close()
    other = socket.create_connection(("127.0.0.1", dns_server.port), timeout=5,
                                     source_address=("127.0.0.2", 0))
    assert tcp_ask(other, make_query(OTTER))["rcode"] == NOERROR
    assert wait_closed(socks[0])  # the oldest made room
    socks[0].close()
    socks[0] = other
    socks.pop().close()
    for _ in range(50):  # the freed slot is seen once the server reads the EOF
        sock = tcp_connect(dns_server)
        try:
            if tcp_ask(sock, make_query(OTTER))["rcode"] == NOERROR:
                break
        except (AssertionError, OSError):
            sock.close()
    else:
        raise AssertionError("a freed tcp slot was never reused")
    socks.append(sock)
    for sock in socks:
        sock.close()


def test_dns_tcp_pipelined_queries_sent_byte_by_byte(dns_server):
    one, two = make_query(OTTER, qid=1), make_query(FOX, qid=2)
    sock = tcp_connect(dns_server)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for byte in frame(one) + frame(two):
        sock.send(bytes([byte]))
    ids = []
    for _ in range(2):
        (length,) = struct.unpack("!H", recv_exact(sock, 2))
        ids.append(parse(recv_exact(sock, length))["id"])
    assert ids == [1, 2]
    sock.close()


def test_dns_tcp_client_that_never_reads_is_bounded(dns_server):
    """A client that pipelines queries with large answers and never reads:
    the server stops reading from it (its sends stall) and drops it at the
    query deadline, then serves a fresh connection."""
    dns_server.TCP_QUERY_DEADLINE_S = 1.0
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", dns_server.port))
    sock.settimeout(2.0)
    query, sent = frame(make_query(MANY, TXT)), 0
    started = time.monotonic()
    with pytest.raises(OSError):  # a stall (timeout) or the server's reset
        for _ in range(20000):
            sent += sock.send(query * 50)
    assert sent < 20000 * len(query), "the server kept reading from a client that never reads"
    sock.settimeout(5.0)
    for _ in range(10000):  # read what was answered, until the server's close
        try:
            if not sock.recv(65536):
                break
        except ConnectionResetError:
            break
    assert time.monotonic() - started < 10
    sock.close()
    fresh = tcp_connect(dns_server)
    assert len(tcp_ask(fresh, make_query(MANY, TXT))["answer"]) == 40
    fresh.close()


def test_dns_failing_lookup_gets_servfail_and_server_goes_on(dns_server):
    def broken(name):
        raise RuntimeError("store unavailable")
    dns_server.zone.lookup = broken
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", dns_server.port))
    assert parse(_ask_udp(sock, make_query(OTTER)))["rcode"] == SERVFAIL
    assert parse(_ask_udp(sock, make_query(DOMAIN, SOA)))["rcode"] == NOERROR
    sock.close()


# ---- the responder wired into a running server ------------------------------------

class DnsEndpoint:
    """What dig() needs of a server: its DNS port on 127.0.0.1."""

    def __init__(self, port):
        self.port = port


def dns_port_of(handle):
    return int(re.search(r"ready http=.* dns=[\d.]+:(\d+)", handle.proc.stderr()).group(1))


@pytest.fixture
def dns_server_proc(workdir):
    """A pipe2me server with DYNAMIC_DNS_SERVICE=builtin and DNS_PORT (free),
    honouring client subnets from 127.0.0.1 (dig's source here)."""
    handle = ServerHandle(workdir, extra=["--dynamic-dns-service", "builtin", "--dns-port", "0",
                                          "--dns-client-subnet-from", "127.0.0.1"])
    handle.dns = DnsEndpoint(dns_port_of(handle))
    yield handle
    assert handle.stop() == 0


def read_info(pod_dir):
    text = open(os.path.join(pod_dir, "pipe2me.info.inc")).read()
    return dict(re.findall(r"^(PIPE2ME_\w+)='?([^'\n]*)'?$", text, re.M))


def api_check(handle, pod_dir, body=None):
    """POST /tunnels/<id>/check as the pod would; (status, answer)."""
    info = read_info(pod_dir)
    return request_json("%s/tunnels/%s/check" % (handle.url, info["PIPE2ME_ID"]), "POST",
                        body or {}, secret=info["PIPE2ME_SECRET"], timeout=30)


def tunnel_file(handle, pod_dir):
    return os.path.join(handle.state_dir, "tunnels", read_info(pod_dir)["PIPE2ME_ID"] + ".json")


def soa_serial(endpoint):
    status, flags, sections, out = dig(endpoint, DOMAIN, "SOA")
    return int(sections["ANSWER"][0][6])


def answers(endpoint, name, *args):
    status, flags, sections, out = dig(endpoint, name, "A", *args)
    return status, [r[4] for r in sections["ANSWER"]], flags, out


@needs_dig
def test_dns_wired_tunnel_answered_authoritatively_udp_and_tcp(dns_server_proc, tmp_path):
    fqdn = setup_pod(dns_server_proc, str(tmp_path / "pod"), "tcp")
    for extra in ([], ["+tcp"]):
        status, flags, sections, out = dig(dns_server_proc.dns, fqdn, "A", *extra)
        assert status == "NOERROR" and {"qr", "aa"} <= flags, out
        assert [(r[1], r[3], r[4]) for r in sections["ANSWER"]] == [("60", "A", "127.0.0.1")], out


@needs_dig
def test_dns_wired_unknown_nxdomain_with_soa_outside_refused(dns_server_proc):
    for extra in ([], ["+tcp"]):
        status, flags, sections, out = dig(dns_server_proc.dns, "nobody-home." + DOMAIN, "A", *extra)
        assert status == "NXDOMAIN" and "aa" in flags, out
        assert [r[3] for r in sections["AUTHORITY"]] == ["SOA"], out
        status, flags, sections, out = dig(dns_server_proc.dns, "example.org", "A", *extra)
        assert status == "REFUSED", out


@needs_dig
def test_dns_wired_malformed_packets_get_formerr_or_nothing(dns_server_proc):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", dns_server_proc.dns.port))
    question = encode_name("x." + DOMAIN) + struct.pack("!HH", A, 1)
    cases = [make_query(DOMAIN)[:20],                                       # truncated
             struct.pack("!6H", 0xBEEF, 0, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01",  # loop
             struct.pack("!6H", 0xBEEF, 0, 0, 0, 0, 0),                     # 0 questions
             struct.pack("!6H", 0xBEEF, 0, 100, 0, 0, 0) + question * 100]  # 100 questions
    for packet in cases:
        sock.send(packet)
        assert parse(sock.recv(65535))["rcode"] == FORMERR
    rng = random.Random(11)
    for _ in range(300):
        sock.send(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80))))
    tcp = socket.create_connection(("127.0.0.1", dns_server_proc.dns.port), timeout=5)
    tcp.sendall(struct.pack("!H", 3) + b"abc")  # a frame shorter than a header: closed
    assert wait_closed(tcp)
    status, flags, sections, out = dig(dns_server_proc.dns, DOMAIN, "SOA", "+tcp")
    assert status == "NOERROR" and "aa" in flags, out
    sock.close()


@needs_dig
def test_dns_wired_serial_follows_tunnels_and_deleted_name_goes(dns_server_proc, tmp_path):
    first = soa_serial(dns_server_proc.dns)
    pod_dir = str(tmp_path / "pod")
    fqdn = setup_pod(dns_server_proc, pod_dir, "tcp")
    wait_until(lambda: soa_serial(dns_server_proc.dns) > first, 10, what="SOA serial bump")
    assert answers(dns_server_proc.dns, fqdn)[1] == ["127.0.0.1"]
    subprocess.run([sys_python(), POD_SCRIPT, "--dir", pod_dir, "clear", "--yes"],
                   check=True, capture_output=True, timeout=60)
    wait_until(lambda: answers(dns_server_proc.dns, fqdn)[0] == "NXDOMAIN", 10,
               what="NXDOMAIN after the tunnel was deleted")


def sys_python():
    import sys
    return sys.executable


POD_SCRIPT = os.path.join(os.path.dirname(SERVER), "pipe2me_pod.py")


@needs_dig
def test_dns_wired_public_address_answers_apex_and_tunnels(workdir, tmp_path):
    handle = ServerHandle(workdir, extra=["--dns-port", "0", "--public-address", "198.51.100.7",
                                          "--dynamic-dns-service", "builtin"])
    try:
        endpoint = DnsEndpoint(dns_port_of(handle))
        fqdn = setup_pod(handle, str(tmp_path / "pod"), "tcp")
        assert answers(endpoint, DOMAIN)[1] == ["198.51.100.7"]
        assert answers(endpoint, fqdn)[1] == ["198.51.100.7"]
        status, flags, sections, out = dig(endpoint, DOMAIN, "NS")
        assert [r[4] for r in sections["ANSWER"]] == ["ns.%s." % DOMAIN], out
    finally:
        assert handle.stop() == 0


@needs_dig
def test_dns_wired_direct_record_and_split_horizon(dns_server_proc, tmp_path):
    """A tunnel whose last check said direct answers the router's address, and
    the pod's LAN address to clients behind that router (ECS stands in for the
    source address here); dns-refresh finds 127.0.0.5 to be the server's own
    address, marks the tunnel relayed and the answer falls back, once."""
    pod_dir = str(tmp_path / "pod")
    fqdn = setup_pod(dns_server_proc, pod_dir, "tcp")
    path = tunnel_file(dns_server_proc, pod_dir)
    record = json.load(open(path))
    record["reach"] = {"status": "direct", "address": "127.0.0.5", "lan_address": "192.168.9.10",
                       "cgnat": False, "ports": {}, "checked_at": int(time.time()), "reason": None}
    srv.write_json(path, record, 0o600)
    dns_server_proc.proc.popen.send_signal(1)  # SIGHUP: reload
    endpoint = dns_server_proc.dns
    wait_until(lambda: answers(endpoint, fqdn)[1] == ["127.0.0.5"], 10, what="direct answer")
    assert answers(endpoint, fqdn, "+subnet=127.0.0.5/32")[1] == ["192.168.9.10"]
    assert answers(endpoint, fqdn, "+subnet=127.0.0.6/32")[1] == ["127.0.0.5"]
    refresh = dns_refresh(dns_server_proc)
    assert refresh.returncode == 0 and "relayed %s" % fqdn in refresh.stdout, refresh.stderr
    wait_until(lambda: answers(endpoint, fqdn)[1] == ["127.0.0.1"], 10, what="relayed answer")
    again = dns_refresh(dns_server_proc)
    assert again.returncode == 0 and again.stdout == "", again.stdout
    assert json.load(open(path))["reach"]["status"] == "relayed"


def dns_refresh(handle, *extra, env=None):
    return subprocess.run([sys_python(), SERVER, "--state-dir", handle.state_dir,
                           "--listen-address", "127.0.0.1", "--dynamic-dns-service", "builtin",
                           "--dns-port", "0"] + list(extra) + ["dns-refresh"],
                          capture_output=True, text=True, timeout=60, env=env)


# ---- reachability checks -------------------------------------------------------------

def test_dns_check_from_loopback_is_relayed_without_probing(dns_server_proc, tmp_path):
    pod_dir = str(tmp_path / "pod")
    setup_pod(dns_server_proc, pod_dir, "tcp,https")
    status, answer = api_check(dns_server_proc, pod_dir, {"lan_address": "192.168.9.10"})
    assert status == 200, answer
    assert answer["status"] == "relayed" and answer["address"] == "127.0.0.1", answer
    assert "own address" in answer["reason"] and answer["ports"] == {}, answer
    assert answer["cgnat"] is False and answer["lan_address"] == "192.168.9.10"
    stored = json.load(open(tunnel_file(dns_server_proc, pod_dir)))["reach"]
    assert stored["status"] == "relayed" and abs(stored["checked_at"] - time.time()) < 60


def test_dns_check_reports_cgnat_and_refuses_bad_addresses(dns_server_proc, tmp_path):
    pod_dir = str(tmp_path / "pod")
    setup_pod(dns_server_proc, pod_dir, "tcp")
    status, answer = api_check(dns_server_proc, pod_dir, {"external_address": "100.64.0.9"})
    assert status == 200 and answer["cgnat"] is True, answer
    assert "carrier-grade NAT" in answer["reason"] and "100.64.0.9" in answer["reason"], answer
    for body in ({"external_address": "not-an-ip"}, {"lan_address": "::1"},
                 {"lan_address": 5}):
        status, answer = api_check(dns_server_proc, pod_dir, body)
        assert status == 400 and "error" in answer, (body, answer)


def test_dns_check_needs_the_tunnel_secret(dns_server_proc, tmp_path):
    pod_dir = str(tmp_path / "pod")
    setup_pod(dns_server_proc, pod_dir, "tcp")
    info = read_info(pod_dir)
    answer = request("%s/tunnels/%s/check" % (dns_server_proc.url, info["PIPE2ME_ID"]), "POST",
                     {}, timeout=30)
    assert answer.status == 401, answer.body


@pytest.fixture
def self_signed(tmp_path):
    """(cert path, key path, SHA-256 of the DER certificate) made by openssl."""
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=probe.test"],
                   check=True, capture_output=True, timeout=60)
    der = ssl.PEM_cert_to_DER_cert(open(cert).read())
    return cert, key, srv.sha256_hex(der)


def serve_once(sock, context=None):
    """Accept connections on sock in a thread, TLS-wrapped when context is given."""
    def run():
        for _ in range(4):
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                if context is not None:
                    try:
                        context.wrap_socket(conn, server_side=True).close()
                    except (OSError, ssl.SSLError):
                        pass
    threading.Thread(target=run, daemon=True).start()


def test_dns_probe_tcp_and_tls_fingerprint(self_signed):
    cert, key, fingerprint = self_signed
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    plain, tls = socket.socket(), socket.socket()
    for sock in (plain, tls):
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
    serve_once(plain)
    serve_once(tls, context)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    record = {"fqdn": "probe.test", "protocols": ["tcp", "https", "tcp"],
              "ports": [plain.getsockname()[1], tls.getsockname()[1], closed_port],
              "cert_sha256": [fingerprint]}
    outcome = srv.probe_tunnel(record, "127.0.0.1")
    assert outcome[plain.getsockname()[1]] is None and outcome[tls.getsockname()[1]] is None
    assert "refused" in outcome[closed_port].lower()
    wrong = dict(record, cert_sha256=["0" * 64], protocols=["tcp", "https"], ports=record["ports"][:2])
    reason = srv.probe_tunnel(wrong, "127.0.0.1")[tls.getsockname()[1]]
    assert "not this tunnel's" in reason
    not_tls = dict(record, protocols=["https"], ports=[plain.getsockname()[1]])
    assert "TLS handshake failed" in srv.probe_tunnel(not_tls, "127.0.0.1")[plain.getsockname()[1]]
    plain.close()
    tls.close()


def test_dns_own_addresses_never_probed():
    settings = srv.load_settings(flags={"PUBLIC_ADDRESS": "198.51.100.7"}, environ={})
    for address in ("127.0.0.1", "127.8.9.10", "::1", "0.0.0.0", "198.51.100.7"):
        assert srv.is_own_address(address, settings), address
    assert not srv.is_own_address("192.0.2.55", settings)  # TEST-NET-1: not on this host


def test_dns_tunnel_answers_follow_the_check():
    settings = srv.load_settings(flags={"PUBLIC_ADDRESS": "198.51.100.7,2001:db8::7"}, environ={})
    record = {"fqdn": "a.pipe2.localhost", "expires_at": time.time() + 60}
    assert srv.tunnel_answers(record, settings) == (["198.51.100.7"], ["2001:db8::7"], None)
    record["reach"] = {"status": "direct", "address": "203.0.113.4", "lan_address": "192.168.1.9"}
    assert srv.tunnel_answers(record, settings) == (
        ["203.0.113.4"], ["2001:db8::7"], {"203.0.113.4": ["192.168.1.9"]})
    record["reach"] = {"status": "direct", "address": "2001:db8::44", "lan_address": None}
    assert srv.tunnel_answers(record, settings) == (["198.51.100.7"], ["2001:db8::44"], None)
    record["reach"]["status"] = "relayed"
    wanted = srv.dns_wanted([record, dict(record, fqdn="old.pipe2.localhost", expires_at=1)],
                            settings, time.time())
    assert wanted == {("a.pipe2.localhost", "A"): ["198.51.100.7"],
                      ("a.pipe2.localhost", "AAAA"): ["2001:db8::7"]}
    local = srv.load_settings(flags={"LISTEN_ADDRESS": "0.0.0.0"}, environ={})
    assert srv.server_addresses(local) == ["127.0.0.1"]  # *.localhost domain
    public = srv.load_settings(flags={"TUNNEL_DOMAIN": "pipe2.example.com"}, environ={})
    assert srv.server_addresses(public) == []


def test_dns_pod_check_prints_status_address_time(dns_server_proc, tmp_path):
    """`check` on this host: the server sees 127.0.0.1, its own address, so the
    pod is offline (relayed); --no-router keeps the router out of it."""
    pod_dir = str(tmp_path / "pod")
    setup_pod(dns_server_proc, pod_dir, "tcp")
    done = subprocess.run([sys_python(), POD_SCRIPT, "--dir", pod_dir, "check", "--no-router"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["STATUS=offline", "ADDRESS=127.0.0.1"], done.stdout
    assert re.fullmatch(r"TIME=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", lines[2])
    assert lines[3:] == ["REACH=relayed"], done.stdout
    assert "not directly reachable" in done.stderr and "own address" in done.stderr
    reach = json.load(open(tunnel_file(dns_server_proc, pod_dir)))["reach"]
    assert reach["status"] == "relayed" and reach["address"] == "127.0.0.1"


# ---- TXT records for ACME DNS-01 ----------------------------------------------------

@needs_dig
def test_dns_builtin_txt_set_and_cleared_for_acme(tmp_path):
    """BuiltinDns.set_txt, as ACME DNS-01 calls it from another thread, is
    answered at once and cleared by an empty list; names outside the domain
    are refused."""
    settings = srv.load_settings(flags={"STATE_DIR": str(tmp_path), "DNS_PORT": "0",
                                        "LISTEN_ADDRESS": "127.0.0.1"}, environ={})
    store = srv.Store(settings)
    store.load()
    loop = srv.EventLoop()
    dns = srv.BuiltinDns(settings, store)
    endpoint = DnsEndpoint(dns.start(loop))
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        dns.set_txt(ACME.upper() + ".", ["token-one", "token-two"])
        status, flags, sections, out = dig(endpoint, ACME, "TXT")
        assert status == "NOERROR" and "aa" in flags, out
        assert sorted(r[4] for r in sections["ANSWER"]) == ['"token-one"', '"token-two"'], out
        dns.set_txt(ACME, [])
        assert dig(endpoint, ACME, "TXT")[0] == "NXDOMAIN"
        with pytest.raises(ValueError):
            dns.set_txt("_acme-challenge.example.com", ["x"])
    finally:
        loop.call_soon_threadsafe(dns.close)
        loop.stop()
        thread.join(10)
