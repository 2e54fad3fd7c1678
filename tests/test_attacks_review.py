"""Attacks on the integrated server by a stranger and by a tenant: each test
is one way a tenant could reach another tenant's traffic or the server's
state, and shows it no longer works.

Real parts on 127.0.0.0/8: the server and pods as processes, services in
this process behind the pods."""

import select
import socket
import time

import pytest

from conftest import LocalService, ServerHandle, connect, http_pods, read_head


def two_responses_for_one(conn):
    """A hostile service: for each request, its answer and then a second,
    forged response, in one write."""
    while read_head(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nA1"
                     b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")


def garbled(conn):
    """A hostile service: for /status a status line no parser can read, a
    body, and the end of the connection; else a chunked response whose chunk
    size is no number, then the connection held open."""
    head = read_head(conn)
    if head.startswith(b"GET /status "):
        conn.sendall(b"HTTP/1.1 2000 Weird\r\n\r\nbody after a bad status line")
    elif head:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nyy\r\n")
        conn.recv(4096)  # until the front drops the stream


SEEN = []  # the request heads the honest service got


def honest(conn):
    """A keep-alive service answering "honest" to each request."""
    while True:
        head = read_head(conn)
        if not head:
            return
        SEEN.append(head)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhonest")


def read_until(sock, marker, timeout=15.0):
    """What the socket sends until `marker` has come, EOF or the timeout."""
    deadline, data = time.monotonic() + timeout, b""
    while marker not in data and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return data


HEAD_DEADLINE_S = 4  # --front-head-deadline of the server below (the default 10 s, waited out, is slow)


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    """One server with three http tunnels: "evil" and "garbled" before
    hostile services, "victim" before an honest one, the pods running."""
    workdir = str(tmp_path_factory.mktemp("attacks"))
    server = ServerHandle(workdir, extra=["--front-head-deadline", str(HEAD_DEADLINE_S)])
    with http_pods(server, workdir, {"evil": lambda: LocalService(two_responses_for_one),
                                     "victim": lambda: LocalService(honest),
                                     "garbled": lambda: LocalService(garbled)}) as tunnels:
        server.names = {name: fqdn for name, (fqdn, _, _) in tunnels.items()}
        yield server


def test_attack_pod_response_spilling_into_the_next_tenants_request(tenants):
    """A pod that answers one request with two responses must not answer a
    request pipelined behind it for another tunnel."""
    evil, victim = tenants.names["evil"], tenants.names["victim"]
    with connect(tenants.http) as sock:
        sock.sendall(b"GET /1 HTTP/1.1\r\nHost: %s\r\n\r\nGET /2 HTTP/1.1\r\nHost: %s\r\n\r\n"
                     % (evil.encode(), victim.encode()))
        answers = read_until(sock, b"honest")
    assert b"forged" not in answers, answers
    assert answers.endswith(b"honest"), answers


def server_rss_bytes(server):
    with open("/proc/%d/status" % server.proc.popen.pid) as f:
        return 1024 * int(next(l for l in f if l.startswith("VmRSS:")).split()[1])


def test_attack_stranger_pipelining_front_answers_without_reading(tenants):
    """A stranger pipelines requests the front answers itself (404 for an
    unknown name) and never reads: the answers must not pile up in the
    server's memory; the front stops reading instead."""
    request = b"GET /x HTTP/1.1\r\nHost: nobody.pipe2.localhost\r\n\r\n" * 64
    before = server_rss_bytes(tenants)
    with connect(tenants.http) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        sent, deadline = 0, time.monotonic() + 60
        while sent < 64 * 1024 * 1024 and time.monotonic() < deadline:
            if not select.select([], [sock], [], 2)[1]:
                break  # not writable for 2 s: the server stopped reading
            sent += sock.send(request)
        grown = server_rss_bytes(tenants) - before
    assert grown < 32 * 1024 * 1024, (sent, grown)


def test_attack_consumer_forging_forwarding_fields_with_underscores(tenants):
    """X_Forwarded_For is X-Forwarded-For to CGI, PHP and WSGI services
    (HTTP_X_FORWARDED_FOR): a consumer must not get its own value through."""
    victim = tenants.names["victim"].encode()
    spoof = b"X_Forwarded_For: 6.6.6.6\r\nx-forwarded_proto: https\r\nX_Forwarded_Host: evil\r\n"
    with connect(tenants.http) as sock:
        sock.sendall(b"GET /u HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (victim, spoof))
        assert read_until(sock, b"honest").endswith(b"honest")
    head = next(h for h in reversed(SEEN) if h.startswith(b"GET /u "))
    assert b"6.6.6.6" not in head and b"evil" not in head, head
    assert b"\r\nX-Forwarded-For: 127.0.0.1\r\n" in head, head


def test_attack_stranger_holding_streams_with_bodies_never_sent(tenants):
    """A request head promising a body that never comes holds one of the
    tunnel's streams: the front closes it after FRONT_HEAD_DEADLINE (4 s here)
    without a byte, as it does a head that never ends."""
    victim = tenants.names["victim"].encode()
    with connect(tenants.http) as sock:
        sock.sendall(b"POST /slow HTTP/1.1\r\nHost: %s\r\nContent-Length: 100\r\n\r\nx" % victim)
        started = time.monotonic()
        read_until(sock, b"never sent", timeout=40)
        waited = time.monotonic() - started
    assert HEAD_DEADLINE_S - 0.5 < waited < HEAD_DEADLINE_S + 20, waited


@pytest.mark.parametrize("where", ["first", "after-a-response"])
def test_attack_half_sent_head_gets_408_and_an_idle_connection_closes_silently(tenants, where):
    """A request head that stops halfway is answered 408 Request Timeout at
    FRONT_HEAD_DEADLINE, on a new connection and on a kept-alive one (it got
    a 431, a status for heads too large, or nothing); a kept-alive
    connection with no byte of a next request is closed without a word."""
    victim = tenants.names["victim"].encode()
    first = b"GET /a HTTP/1.1\r\nHost: %s\r\n\r\n" % victim if where != "first" else b""
    with connect(tenants.http) as sock:
        if first:
            sock.sendall(first)
            assert read_until(sock, b"honest").endswith(b"honest")
        sock.sendall(b"GET /b HTTP/1.1\r\nHost: " + victim)
        answer = read_until(sock, b"never sent", timeout=HEAD_DEADLINE_S + 20)
    assert answer.startswith(b"HTTP/1.") and answer.split(b" ")[1] == b"408", answer
    if where == "first":
        return
    with connect(tenants.http) as sock:
        sock.sendall(first)
        assert read_until(sock, b"honest").endswith(b"honest")
        started = time.monotonic()
        assert read_until(sock, b"never sent", timeout=HEAD_DEADLINE_S + 20) == b""
    assert time.monotonic() - started < HEAD_DEADLINE_S + 10, "not closed"


def test_attack_pod_response_with_malformed_chunks_ends_the_connection(tenants):
    """A service whose chunked body cannot be framed: the consumer has the
    head already, so the front closes the connection (the stream with it)
    at once; the bad framing is an answer to judge, not an error inside."""
    seen = tenants.mark()
    with connect(tenants.http) as sock:
        sock.sendall(b"GET /g HTTP/1.1\r\nHost: %s\r\n\r\n" % tenants.names["garbled"].encode())
        started = time.monotonic()
        answer = read_until(sock, b"never sent", timeout=HEAD_DEADLINE_S + 6)
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"yy" not in answer, answer
    assert waited < HEAD_DEADLINE_S, waited
    assert "internal error" not in tenants.proc.stderr()[seen:]


def test_attack_pod_response_with_an_unreadable_status_line_is_relayed_until_it_closes(tenants):
    """A head the front cannot frame ends with the connection: what follows
    it is the body, relayed as it is (not read as the head of a response
    still to come), and the consumer's connection closes after it."""
    with connect(tenants.http) as sock:
        garbled = tenants.names["garbled"].encode()
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: %s\r\n\r\n" % garbled)
        answer = read_until(sock, b"never sent", timeout=HEAD_DEADLINE_S + 6)
    assert answer == b"HTTP/1.1 2000 Weird\r\n\r\nbody after a bad status line", answer
