"""Attacks on the built-in DNS of a running server, made as an attacker
would make them from loopback: a UDP query flood from one process (response
rate limiting per source prefix, with truncated "slip" answers that send a
real resolver to TCP), slow and hoarding TCP clients (a per-source share of
the TCP slots, a deadline per whole query), and a forged EDNS client-subnet
option naming a router's address (honoured only from listed resolvers).
The legitimate client is the real `dig`, asking from another loopback
address (127.0.0.2, or 127.0.1.1 for another /24).
"""

import json
import socket
import struct
import time

from conftest import ServerHandle, setup_pod, wait_until
from test_dns import (A, DOMAIN, TC, DnsEndpoint, answers, dig, dns_port_of, make_query,
                      needs_dig, parse, srv, tunnel_file)

RATE = 20


def start_dns(workdir, *extra):
    handle = ServerHandle(workdir, extra=["--dynamic-dns-service", "builtin", "--dns-port", "0"]
                          + list(extra))
    handle.dns = DnsEndpoint(dns_port_of(handle))
    return handle


def drain(sock, quiet_s=0.5, limit=100000):
    """Responses received until the socket stays quiet for quiet_s."""
    sock.settimeout(quiet_s)
    got = []
    for _ in range(limit):
        try:
            got.append(parse(sock.recv(65535)))
        except (socket.timeout, BlockingIOError):
            break
    return got


@needs_dig
def test_dns_abuse_udp_flood_is_rate_limited_with_slip(workdir):
    """One process fires 2,000 queries at once from 127.0.0.1: about RATE of
    them get answers, every second one past the rate a bare truncated answer,
    the rest nothing; a resolver in another /24 is answered as usual, and dig
    from the flooded prefix still gets its answer by retrying over TCP."""
    handle = start_dns(workdir, "--dns-rate-limit", str(RATE), "--dns-rate-slip", "2")
    try:
        flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        flood.connect(("127.0.0.1", handle.dns.port))
        started, responses = time.monotonic(), []
        for qid in range(2000):
            flood.send(make_query(DOMAIN, A, qid=qid))
            if qid % 100 == 99:  # let the server keep up, so the kernel drops nothing
                responses += drain(flood, 0.0)
        responses += drain(flood)
        elapsed = time.monotonic() - started
        full = [r for r in responses if not r["flags"] & TC]
        slipped = [r for r in responses if r["flags"] & TC]
        assert 0 < len(full) <= RATE + RATE * elapsed + 5, (len(full), elapsed)
        assert all(r["answer"] == [] for r in slipped) and len(slipped) >= 10, len(slipped)
        assert len(responses) < 1500, len(responses)
        status, flags, sections, out = dig(handle.dns, DOMAIN, "A", "-b", "127.0.1.1")
        assert status == "NOERROR" and [r[4] for r in sections["ANSWER"]] == ["127.0.0.1"], out
        for qid in range(200):  # the flooded prefix is still over its rate
            flood.send(make_query(DOMAIN, A, qid=qid))
        status, flags, sections, out = dig(handle.dns, DOMAIN, "A", "+tries=3")
        assert status == "NOERROR" and sections["ANSWER"], out
        flood.close()
    finally:
        assert handle.stop() == 0


def test_dns_abuse_udp_rate_limit_off_answers_everything(workdir):
    """DNS_RATE_LIMIT=0 switches the limiter off (and proves the test above
    counts what the limiter did)."""
    handle = start_dns(workdir, "--dns-rate-limit", "0")
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(("127.0.0.1", handle.dns.port))
        got, missing = 0, False
        for qid in range(300):
            sock.send(make_query(DOMAIN, A, qid=qid))
            if qid % 10 == 9:  # every answer so far, before the next ten (the limiter drops them)
                sock.settimeout(2.0)
                while got < qid + 1 and not missing:
                    try:
                        parse(sock.recv(65535))
                        got += 1
                    except socket.timeout:
                        missing = True
            if missing:
                break
        got += len(drain(sock, 0.2))
        assert got == 300, got
        sock.close()
    finally:
        assert handle.stop() == 0


def slow_tcp(port, source="127.0.0.1"):
    """A TCP connection to the DNS port that sends the first byte of a query."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.send(b"\x00")
    return sock


def closed_by_peer(sock):
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, socket.timeout):
        return False


@needs_dig
def test_dns_abuse_tcp_hoarding_one_address_leaves_slots_for_others(workdir):
    """80 slow connections from 127.0.0.1 take only that address's share of
    the TCP slots: dig over TCP from 127.0.0.2 is answered within 1 s."""
    handle = start_dns(workdir)
    hoard = []
    try:
        for _ in range(80):
            try:
                hoard.append(slow_tcp(handle.dns.port))
            except OSError:
                break
        started = time.monotonic()
        status, flags, sections, out = dig(handle.dns, DOMAIN, "SOA", "+tcp", "-b", "127.0.0.2")
        took = time.monotonic() - started
        assert status == "NOERROR" and "aa" in flags, out
        assert took < 1.0, took
        print("\ndig over TCP from 127.0.0.2 answered in %.3f s with 80 slow connections"
              " from 127.0.0.1" % took)
    finally:
        for sock in hoard:
            sock.close()
        assert handle.stop() == 0


def test_dns_abuse_tcp_trickled_query_closed_at_its_deadline(workdir):
    """One byte a second never completes a query: the whole-query deadline
    (5 s) closes the connection, however often a byte arrives."""
    handle = start_dns(workdir)
    try:
        sock = slow_tcp(handle.dns.port)
        query = struct.pack("!H", 40) + make_query(DOMAIN)
        started = time.monotonic()
        closed = False
        for byte in query[1:12]:
            sock.settimeout(1.0)
            if closed_by_peer(sock):
                closed = True
                break
            try:
                sock.send(bytes([byte]))
            except OSError:
                closed = True
                break
        took = time.monotonic() - started
        assert closed and took < 8.0, (closed, took)
        sock.close()
    finally:
        assert handle.stop() == 0


@needs_dig
def test_dns_abuse_client_subnet_forged_by_an_unlisted_source_is_ignored(workdir, tmp_path):
    """A tunnel is direct at router 127.0.0.5 with LAN address 192.168.9.10.
    A query from 127.0.0.1 naming the router in its client-subnet option
    gets the router's public address and no echoed option; the listed
    resolver 127.0.0.2 gets the LAN address for the same option."""
    handle = start_dns(workdir, "--dns-client-subnet-from", "127.0.0.2")
    try:
        pod_dir = str(tmp_path / "pod")
        fqdn = setup_pod(handle, pod_dir, "tcp")
        path = tunnel_file(handle, pod_dir)
        record = json.load(open(path))
        record["reach"] = {"status": "direct", "address": "127.0.0.5",
                           "lan_address": "192.168.9.10", "cgnat": False, "ports": {},
                           "checked_at": int(time.time()), "reason": None}
        srv.write_json(path, record, 0o600)
        handle.proc.popen.send_signal(1)  # SIGHUP: reload
        wait_until(lambda: answers(handle.dns, fqdn)[1] == ["127.0.0.5"], 10, what="direct")
        status, got, flags, out = answers(handle.dns, fqdn, "+subnet=127.0.0.5/32")
        assert got == ["127.0.0.5"] and "CLIENT-SUBNET" not in out, out
        status, got, flags, out = answers(handle.dns, fqdn, "+subnet=127.0.0.5/32",
                                          "-b", "127.0.0.2")
        assert got == ["192.168.9.10"] and "CLIENT-SUBNET: 127.0.0.5/32/32" in out, out
    finally:
        assert handle.stop() == 0
