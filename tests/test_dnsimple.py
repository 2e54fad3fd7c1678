"""Dynamic DNS through dnsimple (DYNAMIC_DNS_SERVICE=dnsimple:TOKEN), against
a local stand-in of its v2 API (tests/dnsimple_standin.py) that checks the
token and follows the documented request and response shapes.

TUNNEL_DOMAIN is pipe2.example.com inside the zone example.com, which also
holds records pipe2me did not make (and enough of them to need pagination):
those must never change."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import SERVER, ServerHandle, free_port, run_pod, setup_pod, wait_until
from helpers import api
from dnsimple_standin import DnsimpleStandin

TOKEN = "dnsimple-account-token-0123"
ZONE = "example.com"
DOMAIN = "pipe2." + ZONE
PUBLIC = "198.51.100.7"


@pytest.fixture
def standin():
    with DnsimpleStandin(TOKEN) as api:
        api.add(ZONE, "www", "A", "192.0.2.80")
        api.add(ZONE, "*.pipe2", "A", "192.0.2.81")      # an operator's wildcard
        api.add(ZONE, "mail", "AAAA", "2001:db8::25")
        for index in range(140):                          # two pages of 100
            api.add(ZONE, "host%d" % index, "TXT", "filler %d" % index)
        api.foreign = {r["id"]: r for r in api.find(ZONE)}
        yield api


def flags(api, token=TOKEN, url=None):
    return ["--tunnel-domain", DOMAIN, "--public-address", PUBLIC,
            "--dynamic-dns-service", "dnsimple:" + token, "--dnsimple-api-url", url or api.url]


def start_server(workdir, api, token=TOKEN, url=None, name="server"):
    return ServerHandle(workdir, extra=flags(api, token, url), name=name)


def dns_refresh(handle, api, url=None):
    argv = [sys.executable, SERVER, "--state-dir", handle.state_dir,
            "--listen-address", "127.0.0.1"] + flags(api, url=url) + ["dns-refresh"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def record_name(fqdn):
    return fqdn[:-len(ZONE) - 1]


def ours(api):
    return [r for r in api.find(ZONE) if r["id"] not in api.foreign]


def assert_foreign_untouched(api):
    now = {r["id"]: r for r in api.find(ZONE)}
    for record_id, record in api.foreign.items():
        assert now.get(record_id) == record, record


def wait_for_record(api, fqdn, content=PUBLIC, timeout=20):
    def found():
        records = api.find(ZONE, record_name(fqdn), "A")
        return records if [r["content"] for r in records] == [content] else None
    return wait_until(found, timeout, what="A %s %s at the stand-in" % (fqdn, content))


def test_dnsimple_new_tunnel_creates_record_and_deleted_tunnel_loses_it(standin, workdir, tmp_path):
    server = start_server(workdir, standin)
    try:
        pod_dir = str(tmp_path / "pod")
        fqdn = setup_pod(server, pod_dir, "tcp")
        (record,) = wait_for_record(standin, fqdn)
        assert record["ttl"] == 60 and record["name"] == record_name(fqdn)
        assert ("GET", "/v2/whoami") in standin.requests        # account from the token
        owned = json.load(open(os.path.join(server.state_dir, "dns_records.json")))
        assert list(owned["records"]) == [str(record["id"])] and owned["zone"] == ZONE
        run_pod(pod_dir, "clear", "--yes", check=True)
        wait_until(lambda: not standin.find(ZONE, record_name(fqdn)), 20, what="record removed")
        assert_foreign_untouched(standin)
        assert ours(standin) == []
    finally:
        assert server.stop() == 0


def test_dnsimple_refresh_twice_changes_nothing_the_second_time(standin, workdir, tmp_path):
    server = start_server(workdir, standin)
    try:
        fqdn = setup_pod(server, str(tmp_path / "pod"), "tcp")
        (record,) = wait_for_record(standin, fqdn)
        with standin.lock:                        # drift: someone edits our record
            standin.records[record["id"]]["content"] = "192.0.2.99"
        first = dns_refresh(server, standin)
        assert first.returncode == 0, first.stderr
        assert first.stdout == "updated A %s %s (was 192.0.2.99)\n" % (fqdn, PUBLIC), first.stdout
        before = standin.mutations()
        second = dns_refresh(server, standin)
        assert second.returncode == 0 and second.stdout == "", second.stdout + second.stderr
        assert standin.mutations() == before
        with standin.lock:                        # someone deletes our record: it comes back
            del standin.records[record["id"]]
        third = dns_refresh(server, standin)
        assert third.stdout == "created A %s %s\n" % (fqdn, PUBLIC), third.stdout + third.stderr
        assert "forgotten ids=%d" % record["id"] in third.stderr
        assert dns_refresh(server, standin).stdout == ""
        assert_foreign_untouched(standin)
    finally:
        assert server.stop() == 0


def test_dnsimple_refresh_while_the_server_is_stopped(standin, workdir, tmp_path):
    """A tunnel deleted while its server is down loses its record at the next
    cron dns-refresh; expired ones too."""
    server = start_server(workdir, standin)
    pod_dir = str(tmp_path / "pod")
    fqdn = setup_pod(server, pod_dir, "tcp")
    wait_for_record(standin, fqdn)
    assert server.stop() == 0
    path = os.path.join(server.state_dir, "tunnels")
    (name,) = os.listdir(path)
    record = json.load(open(os.path.join(path, name)))
    record["expires_at"] = int(time.time()) - 5
    with open(os.path.join(path, name), "w") as fh:
        json.dump(record, fh)
    done = dns_refresh(server, standin)
    assert done.returncode == 0 and done.stdout == "deleted A %s %s\n" % (fqdn, PUBLIC), done
    assert ours(standin) == [] and dns_refresh(server, standin).stdout == ""
    assert_foreign_untouched(standin)


def api_alive(server):
    return api(server, "GET", "/config", timeout=10).status == 200


def test_dnsimple_outage_logged_and_retried_never_fatal(standin, workdir, tmp_path):
    standin.outage = 503
    server = start_server(workdir, standin)
    try:
        fqdn = setup_pod(server, str(tmp_path / "pod"), "tcp")
        server.proc.wait_for(r"dns update failed attempt=\d+ retry_in=\d+s error=dnsimple "
                             r"refused GET .* 503 Service unavailable")
        assert api_alive(server) and not standin.find(ZONE, record_name(fqdn))
        refresh = dns_refresh(server, standin)
        assert refresh.returncode == 3 and "Traceback" not in refresh.stderr
        assert refresh.stderr.strip().splitlines()[-1].startswith("pipe2me_server: dnsimple refused")
        standin.outage = None
        healed = time.monotonic()
        wait_for_record(standin, fqdn, timeout=40)
        print("record created %.1f s after the outage ended" % (time.monotonic() - healed))
        assert api_alive(server)
    finally:
        assert server.stop() == 0


def test_dnsimple_rate_limit_waits_for_the_reset(standin, workdir, tmp_path):
    server = start_server(workdir, standin)
    try:
        standin.rate_limited_until = time.time() + 3  # the new tunnel's record meets the limit
        fqdn = setup_pod(server, str(tmp_path / "pod"), "tcp")
        failed = server.proc.wait_for(r"dns update failed attempt=\d+ retry_in=(\d+)s .*429 quota exceeded")
        assert int(failed.group(1)) <= 4, failed.group(0)  # the reset's, not the 5 s backoff's
        wait_for_record(standin, fqdn, timeout=30)
        assert time.time() >= standin.rate_limited_until
        assert standin.faulted <= 2, standin.faulted   # no hammering while limited
    finally:
        assert server.stop() == 0


def test_dnsimple_unreachable_api_or_bad_token_never_fatal(standin, workdir, tmp_path):
    closed = "http://127.0.0.1:%d" % free_port()
    down = start_server(workdir, standin, url=closed, name="down")
    try:
        down.proc.wait_for(r"dns update failed .*dnsimple unreachable at %s" % closed)
        assert api_alive(down)
    finally:
        assert down.stop() == 0
    os.makedirs(os.path.join(workdir, "second"))
    wrong = start_server(os.path.join(workdir, "second"), standin, token="wrong-token-value",
                         name="wrong")
    try:
        wrong.proc.wait_for(r"dns update failed .*401 Authentication failed")
        assert "wrong-token-value" not in wrong.proc.stderr()
        assert api_alive(wrong)
    finally:
        assert wrong.stop() == 0


def test_dnsimple_direct_tunnel_points_at_router_and_falls_back(standin, workdir, tmp_path):
    """A tunnel whose check said direct gets the router's address; when
    dns-refresh finds it unreachable there (127.0.0.5 is this host's own
    address: never probed) the record goes back to the server, and the running
    server (reloaded) keeps it there."""
    server = start_server(workdir, standin)
    try:
        fqdn = setup_pod(server, str(tmp_path / "pod"), "tcp")
        wait_for_record(standin, fqdn)
        tunnels = os.path.join(server.state_dir, "tunnels")
        (name,) = os.listdir(tunnels)
        record = json.load(open(os.path.join(tunnels, name)))
        record["reach"] = {"status": "direct", "address": "127.0.0.5", "lan_address": None,
                           "cgnat": False, "ports": {}, "checked_at": int(time.time()),
                           "reason": None}
        with open(os.path.join(tunnels, name), "w") as fh:
            json.dump(record, fh)
        server.proc.popen.send_signal(1)  # SIGHUP: the server reloads and reconciles
        wait_for_record(standin, fqdn, content="127.0.0.5")
        seen = len(server.proc.stderr())
        done = dns_refresh(server, standin)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == (
            "relayed %s (was direct at 127.0.0.5: 127.0.0.5 is this server's own address"
            " (the pod runs on the server's host or its network): not probed)" % fqdn), done.stdout
        server.proc.wait_for(r"reloaded tokens=", after=seen)  # notified by dns-refresh
        wait_for_record(standin, fqdn)
        # the record is updated once: by dns-refresh, or first by the notified server
        update = "updated A %s %s (was 127.0.0.5)" % (fqdn, PUBLIC)
        assert lines[1:] == [update] or lines[1:] == [] and \
            "dns record " + update in server.proc.stderr()[seen:], done.stdout
        before = standin.mutations()
        assert dns_refresh(server, standin).stdout == ""
        wait_for_record(standin, fqdn)
        assert standin.mutations() == before
    finally:
        assert server.stop() == 0


def test_dnsimple_txt_records_set_and_cleared_for_acme(standin, workdir, server_mod):
    """DnsimpleProvider.set_txt (ACME DNS-01) creates our TXT record, leaves
    it to A/AAAA reconciliation untouched, changes nothing when asked again
    and deletes it for an empty list."""
    settings = server_mod.load_settings(flags={
        "STATE_DIR": workdir, "TUNNEL_DOMAIN": DOMAIN, "PUBLIC_ADDRESS": PUBLIC,
        "DYNAMIC_DNS_SERVICE": "dnsimple:" + TOKEN, "DNSIMPLE_API_URL": standin.url}, environ={})
    provider = server_mod.DnsimpleProvider(settings)
    name = "_acme-challenge.calm-teal-otter." + DOMAIN
    assert provider.set_txt(name + ".", ["value-1"]) == ["created TXT %s value-1" % name]
    assert [r["content"] for r in standin.find(ZONE, record_name(name), "TXT")] == ["value-1"]
    assert provider.reconcile({}) == []
    assert provider.set_txt(name, ["value-1"]) == []
    assert provider.set_txt(name, []) == ["deleted TXT %s value-1" % name]
    assert standin.find(ZONE, record_name(name), "TXT") == [] and ours(standin) == []
    assert_foreign_untouched(standin)


def test_dnsimple_error_answer_that_stops_coming_is_a_provider_failure(server_mod, monkeypatch):
    """An error answer whose body never arrives whole is dnsimple failing like
    any other (a DnsProviderError, retried later), not a socket timeout that
    escapes the client and ends dns-refresh with a traceback."""
    monkeypatch.setattr(server_mod, "DNSIMPLE_TIMEOUT_S", 0.5)
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 100\r\n\r\n{")
            done.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = server_mod.DnsimpleClient("http://127.0.0.1:%d" % listener.getsockname()[1], TOKEN)
    try:
        with pytest.raises(server_mod.DnsProviderError, match="dnsimple unreachable"):
            client.call("GET", "/whoami")
    finally:
        done.set()
        thread.join(10)
        listener.close()


def test_dnsimple_answer_trickled_is_cut_at_the_timeout(server_mod, monkeypatch):
    """An answer whose body comes a byte every 0.2 s: the call fails at DNSIMPLE_TIMEOUT_S in
    all (urllib's timeout bounds each read, so dns-refresh was held for hours)."""
    from helpers import RawHttp, raises_within
    body = b'{"data": {"account": {"id": 1}}, "padding": "%s"}' % (b"x" * 100)
    raw = RawHttp(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d"
                  b"\r\n\r\n%s" % (len(body), body), gap_s=0.2)
    monkeypatch.setattr(server_mod, "DNSIMPLE_TIMEOUT_S", 1)
    client = server_mod.DnsimpleClient(raw.url, TOKEN)
    try:
        error = raises_within(lambda: client.call("GET", "/whoami"), server_mod.DnsProviderError, 15)
    finally:
        raw.close()
    assert error == "dnsimple unreachable at %s: timed out after 1 s" % raw.url, error
