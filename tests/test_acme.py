"""ACME end to end: the server orders publicly trusted certificates for pods'
own keys from pebble (Let's Encrypt's test CA), started here on loopback
with a TLS certificate made here, its resolver pointed at pipe2me's
built-in DNS, PEBBLE_VA_NOSLEEP=1 and its random nonce rejections left on."""

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time

import pytest

from conftest import (Proc, ServerHandle, clean_env, free_port, public_ports, run_pod,
                      setup_pod, start_pod, wait_until)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("pebble") is None, reason="pebble not installed")]

DOMAIN = "pipe2.test"


class Pebble:
    """pebble on 127.0.0.1 with a certificate for 127.0.0.1 made by the test."""

    def __init__(self, workdir, dns_port, http_port, validity_s=None, name="pebble"):
        self.workdir, self.name = workdir, name
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.cert = os.path.join(self.dir, "cert.pem")
        key = os.path.join(self.dir, "key.pem")
        if not os.path.exists(self.cert):
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                            "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", self.cert,
                            "-days", "2", "-subj", "/CN=pebble test", "-addext",
                            "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        self.port, self.management = free_port(), free_port()
        config = {"listenAddress": "127.0.0.1:%d" % self.port,
                  "managementListenAddress": "127.0.0.1:%d" % self.management,
                  "certificate": self.cert, "privateKey": key, "httpPort": http_port,
                  "tlsPort": free_port(), "ocspResponderURL": "",
                  "externalAccountBindingRequired": False}
        if validity_s:
            config["certificateValidityPeriod"] = validity_s
        self.config = os.path.join(self.dir, "config.json")
        with open(self.config, "w") as fh:
            json.dump({"pebble": config}, fh)
        self.dns_port = dns_port
        self.start()

    def start(self):
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1")
        env.pop("PEBBLE_WFE_NONCEREJECT", None)  # the default 5% of good nonces rejected
        self.proc = Proc(["pebble", "-config", self.config, "-dnsserver",
                          "127.0.0.1:%d" % self.dns_port], self.workdir, self.name, env=env)
        self.proc.wait_for(r"ACME directory available", stream="stdout")

    @property
    def directory(self):
        return "https://127.0.0.1:%d/dir" % self.port

    def root(self):
        """Pebble's root from its management interface, in a file."""
        context = ssl.create_default_context(cafile=self.cert)
        import urllib.request
        with urllib.request.urlopen("https://127.0.0.1:%d/roots/0" % self.management,
                                    context=context, timeout=10) as answer:
            pem = answer.read()
        path = os.path.join(self.dir, "root.pem")
        with open(path, "wb") as fh:
            fh.write(pem)
        return path

    def stop(self):
        return self.proc.stop()


def acme_server(workdir, pebble, http_port, dns_port, *extra, name="server"):
    """A pipe2me server for DOMAIN using pebble, with the built-in DNS on dns_port."""
    return ServerHandle(workdir, extra=[
        "--tunnel-domain", DOMAIN, "--public-address", "127.0.0.1",
        "--dns-port", str(dns_port), "--acme-directory", pebble.directory,
        "--acme-ca-bundle", pebble.cert, "--acme-retry", "1"] + list(extra), name=name)


def fixed_http_port(server, port):
    """ServerHandle binds port 0; HTTP-01 needs the port pebble dials."""
    argv = server.argv()
    argv[argv.index("--http-port") + 1] = str(port)
    return argv


@pytest.fixture
def dns_port():
    return free_port()


@pytest.fixture
def http_port():
    return free_port()


@pytest.fixture
def started():
    """Processes a test started (pods), stopped by PID however the test ends."""
    procs = []
    yield procs
    for proc in procs:
        proc.stop()


@pytest.fixture
def pebble(workdir, dns_port, http_port):
    handle = Pebble(workdir, dns_port, http_port)
    yield handle
    handle.stop()


def issuer(path):
    return subprocess.run(["openssl", "x509", "-noout", "-issuer", "-in", path],
                          capture_output=True, text=True).stdout


def acme_installed(pod_dir):
    """True once the pod's https certificate is pebble's."""
    path = os.path.join(pod_dir, "pipe2me.openssl.cert")
    return os.path.exists(path) and "Pebble" in issuer(path)


def curl(url, cacert, fqdn, port):
    return subprocess.run(["curl", "-sS", "--max-time", "20", "--cacert", cacert,
                           "--resolve", "%s:%d:127.0.0.1" % (fqdn, port), url],
                          capture_output=True, text=True, timeout=30)


def https_pod(workdir, server, name="pod"):
    pod_dir = os.path.join(workdir, name)
    local = free_port()
    fqdn = setup_pod(server, pod_dir, protocols="https", local_ports=[local])
    return pod_dir, fqdn


def acme_pod(workdir, server, started, *extra):
    """(pod, pod_dir, fqdn): an https pod started with --echo, once its ACME certificate is in."""
    pod_dir, fqdn = https_pod(workdir, server)
    pod = start_pod(workdir, pod_dir, "--echo", *extra)
    started.append(pod)
    wait_until(lambda: acme_installed(pod_dir), timeout=60, what="the ACME certificate on the pod")
    return pod, pod_dir, fqdn


def test_acme_dns01_builtin_pod_reached_with_full_verification(workdir, pebble, dns_port, http_port, started):
    server = acme_server(workdir, pebble, http_port, dns_port)
    try:
        pod_dir, fqdn = https_pod(workdir, server)
        before = open(os.path.join(pod_dir, "pipe2me.openssl.cert")).read()
        pod = start_pod(workdir, pod_dir, "--echo")
        started.append(pod)
        wait_until(lambda: acme_installed(pod_dir), timeout=60, what="pebble's certificate on the pod")
        root = pebble.root()
        # the tunnel connection keeps the server-CA certificate
        assert open(os.path.join(pod_dir, "pipe2me.tunnel.cert")).read() == before
        through_sni = curl("https://%s:%d/" % (fqdn, server.https), root, fqdn, server.https)
        assert through_sni.returncode == 0, through_sni.stderr
        assert through_sni.stdout.startswith("GET / HTTP/1.1")
        port = public_ports(pod_dir)[0]
        per_port = curl("https://%s:%d/" % (fqdn, port), root, fqdn, port)
        assert per_port.returncode == 0, per_port.stderr
        assert per_port.stdout.startswith("GET / HTTP/1.1")
        status = run_pod(pod_dir, "status").stdout
        assert "ACME=valid" in status
        # the API on the bare domain has its ACME certificate too
        wait_until(lambda: curl("https://%s:%d/config" % (DOMAIN, server.https), root, DOMAIN,
                                server.https).returncode == 0, timeout=60, what="the API's ACME cert")
        assert pod.stop() == 0
    finally:
        assert server.stop() == 0


def serial(path):
    return subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", path],
                          capture_output=True, text=True).stdout.strip()


def pod_secret(pod_dir):
    with open(os.path.join(pod_dir, "pipe2me.info.inc")) as fh:
        return re.search(r"^PIPE2ME_SECRET='?([^'\n]+)'?$", fh.read(), re.M).group(1)


def pod_id(pod_dir):
    with open(os.path.join(pod_dir, "pipe2me.info.inc")) as fh:
        return re.search(r"^PIPE2ME_ID='?([^'\n]+)'?$", fh.read(), re.M).group(1)


def open_tls(fqdn, port, cafile):
    """A TLS connection through the SNI front, verified with cafile, request not yet sent."""
    context = ssl.create_default_context(cafile=cafile)
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    return context.wrap_socket(raw, server_hostname=fqdn)


def test_acme_renewal_replaces_the_chain_while_start_runs_and_runs_the_hook_once(workdir, dns_port, http_port, started):
    pebble = Pebble(workdir, dns_port, http_port, validity_s=9)
    server = acme_server(workdir, pebble, http_port, dns_port)
    pod = None
    try:
        pod_dir, fqdn = https_pod(workdir, server)
        cert = os.path.join(pod_dir, "pipe2me.openssl.cert")
        hook_log = os.path.join(workdir, "hook.log")
        pod = start_pod(workdir, pod_dir, "--echo", "--on-cert-change",
                        "openssl x509 -noout -serial -in %s >> %s" % (cert, hook_log))
        wait_until(lambda: acme_installed(pod_dir), timeout=60, what="the first ACME certificate")
        first = serial(cert)
        root = pebble.root()
        held = open_tls(fqdn, server.https, root)  # opened before the renewal, used after it
        wait_until(lambda: acme_installed(pod_dir) and serial(cert) != first, timeout=60,
                   what="the renewed certificate")
        held.sendall(b"GET /held HTTP/1.0\r\n\r\n")
        assert b"GET /held" in held.recv(4096)
        held.close()
        after = curl("https://%s:%d/" % (fqdn, server.https), root, fqdn, server.https)
        assert after.returncode == 0, after.stderr
        lines = wait_until(lambda: (open(hook_log).read().split() if os.path.exists(hook_log) else [])
                           [:2] if len(open(hook_log).read().split()) >= 2 else None,
                           timeout=30, what="the hook after the renewal")
        assert lines[0] != lines[1], lines  # once per new certificate, not twice for one
        assert "tunnel up" in pod.stderr() and pod.stderr().count("tunnel up") == 1  # no reconnect
    finally:
        if pod is not None:
            assert pod.stop() == 0
        assert server.stop() == 0
        pebble.stop()


def test_acme_refusal_keeps_the_server_certificate_says_why_and_a_later_success_replaces_it(
        workdir, dns_port, http_port, started):
    from helpers import request_json
    pebble = Pebble(workdir, dns_port, http_port)
    server = acme_server(workdir, pebble, http_port, dns_port)
    pod = None
    try:
        pebble.stop()  # the CA is gone when the pod is set up
        pod_dir, fqdn = https_pod(workdir, server)
        before = open(os.path.join(pod_dir, "pipe2me.openssl.cert")).read()
        pod = start_pod(workdir, pod_dir, "--echo")
        started.append(pod)
        status = wait_until(lambda: (lambda out: out if "ACME=failed" in out else None)(
            run_pod(pod_dir, "status").stdout), timeout=30, what="ACME=failed in status")
        assert re.search(r"ACME_REASON=.*unreachable", status), status
        assert "ACME_NEXT_TRY=20" in status, status
        assert open(os.path.join(pod_dir, "pipe2me.openssl.cert")).read() == before
        status_code, view = request_json(server.url + "/tunnels/" + pod_id(pod_dir),
                                         secret=pod_secret(pod_dir))
        assert status_code == 200 and view["acme"]["state"] == "failed", view
        assert "unreachable" in view["acme"]["reason"] and view["acme"]["next_try_at"]
        shown = subprocess.run(server.argv()[:2] + ["--state-dir", server.state_dir,
                                                    "--acme-directory", pebble.directory,
                                                    "tunnels", "show", pod_id(pod_dir)],
                               capture_output=True, text=True, env=server.env, timeout=30)
        assert json.loads(shown.stdout)["acme"]["state"] == "failed", shown.stdout + shown.stderr
        pebble.start()  # the CA is back: the next retry gets the certificate
        wait_until(lambda: acme_installed(pod_dir), timeout=90, what="the certificate after the retry")
        root = pebble.root()
        through_sni = curl("https://%s:%d/" % (fqdn, server.https), root, fqdn, server.https)
        assert through_sni.returncode == 0, through_sni.stderr
        assert "ACME=valid" in run_pod(pod_dir, "status").stdout
    finally:
        if pod is not None:
            assert pod.stop() == 0
        assert server.stop() == 0
        pebble.stop()


def test_acme_orders_beyond_the_weekly_limit_are_queued_not_failed(workdir, pebble, dns_port, http_port, started):
    # the server's own name takes the one new certificate the limit allows
    server = acme_server(workdir, pebble, http_port, dns_port, "--acme-new-certs-per-week", "1")
    try:
        server.proc.wait_for(r"acme certificate issued key=server", timeout=60)
        pod_dir, _fqdn = https_pod(workdir, server)
        pod = start_pod(workdir, pod_dir, "--echo")
        started.append(pod)
        status = wait_until(lambda: (lambda out: out if "ACME=queued" in out else None)(
            run_pod(pod_dir, "status").stdout), timeout=30, what="ACME=queued in status")
        assert "limit of 1 new certificates a week" in status, status
        assert "ACME_NEXT_TRY=20" in status
        assert not acme_installed(pod_dir)
        assert "acme order started key=%s" % pod_id(pod_dir) not in server.proc.stderr()
        assert pod.stop() == 0
    finally:
        assert server.stop() == 0


def acme_view(server, pod_dir):
    """The tunnel's `acme` view from GET /tunnels/ID."""
    from helpers import request_json
    status, view = request_json(server.url + "/tunnels/" + pod_id(pod_dir), secret=pod_secret(pod_dir))
    assert status == 200, view
    return view["acme"]


def acme_queued(server, pod_dir):
    """The tunnel's `acme` view once it is queued, else None (for wait_until)."""
    view = acme_view(server, pod_dir)
    return view if view["state"] == "queued" else None


SHARE_REASON = "share of 1 new certificates a week (ACME_NEW_CERTS_PER_TOKEN_PER_WEEK)"


def test_acme_a_token_past_its_weekly_share_is_queued_while_other_tokens_get_theirs(
        workdir, pebble, dns_port, http_port, started):
    """Who can fill the week's new certificates? No single token: past its
    share its own orders queue (saying why and until when, across a restart),
    another token's tunnel still gets its certificate."""
    from conftest import write_tokens
    hog, other = "tenant-hog-0001", "tenant-other-0001"
    write_tokens(os.path.join(workdir, "state"), ["%s = lifespan:1h" % hog, "%s = lifespan:1h" % other])
    server = acme_server(workdir, pebble, http_port, dns_port, "--acme-new-certs-per-token-per-week", "1")
    pod_dirs = {name: os.path.join(workdir, name) for name in ("hog-1", "hog-2", "other-1", "hog-3")}

    def new_tunnel(name, token):
        setup_pod(server, pod_dirs[name], protocols="https", local_ports=[free_port()], token=token)
        return pod_dirs[name]
    try:
        first = new_tunnel("hog-1", hog)
        server.proc.wait_for(r"acme certificate issued key=%s" % pod_id(first), timeout=60)
        second = new_tunnel("hog-2", hog)
        view = wait_until(lambda: acme_queued(server, second), timeout=30, what="the hog's 2nd queued")
        assert SHARE_REASON in view["reason"] and "frees up at 20" in view["reason"], view
        assert view["next_try_at"] > time.time() + 6 * 86400, view
        pod = start_pod(workdir, second, "--echo")
        started.append(pod)
        status = wait_until(lambda: (lambda out: out if "ACME=queued" in out else None)(
            run_pod(second, "status").stdout), timeout=30, what="ACME=queued in the pod's status")
        assert "ACME_NEW_CERTS_PER_TOKEN_PER_WEEK" in status and "ACME_NEXT_TRY=20" in status, status
        assert pod.stop() == 0
        # another tenant's new tunnel is not held by the hog's share
        theirs = new_tunnel("other-1", other)
        server.proc.wait_for(r"acme certificate issued key=%s" % pod_id(theirs), timeout=60)
        assert acme_view(server, theirs)["state"] == "valid"
        assert "acme order started key=%s" % pod_id(second) not in server.proc.stderr()
        # the count survives a restart: the hog's next new tunnel waits too
        assert server.proc.stop() == 0
        server.name = "server-restarted"
        server.start(fixed_ports=True)
        third = new_tunnel("hog-3", hog)
        view = wait_until(lambda: acme_queued(server, third), timeout=30, what="the hog's 3rd queued")
        assert SHARE_REASON in view["reason"], view
        shown = subprocess.run(server.argv()[:2] + ["--state-dir", server.state_dir,
                                                    "--acme-directory", pebble.directory,
                                                    "tunnels", "show", pod_id(third)],
                               capture_output=True, text=True, env=server.env, timeout=30)
        assert SHARE_REASON in json.loads(shown.stdout)["acme"]["reason"], shown.stdout + shown.stderr
        assert "acme order started key=%s" % pod_id(third) not in server.proc.stderr()
    finally:
        assert server.stop() == 0


def test_acme_http01_answered_on_the_http_front(workdir, pebble, dns_port, http_port, started):
    server = acme_server(workdir, pebble, http_port, dns_port, "--acme-challenge", "http-01",
                         "--http-port", str(http_port))
    try:
        assert server.http == http_port
        pod, pod_dir, fqdn = acme_pod(workdir, server, started)
        assert "challenge=http-01" in server.proc.stderr()
        root = pebble.root()
        port = public_ports(pod_dir)[0]
        per_port = curl("https://%s:%d/" % (fqdn, port), root, fqdn, port)
        assert per_port.returncode == 0, per_port.stderr
        # a token nobody published is not found, on any name
        stray = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                                "Host: " + fqdn, "http://127.0.0.1:%d/.well-known/acme-challenge/"
                                "nOtAtOkEnOfAnYoRdEr" % http_port], capture_output=True, text=True)
        assert stray.stdout == "404"
        assert pod.stop() == 0
    finally:
        assert server.stop() == 0


class StandinDns:
    """UDP DNS on 127.0.0.1 answering from the dnsimple stand-in's records (as
    dnsimple's name servers answer from its API's): TXT records of a zone;
    every other question gets an empty authoritative answer."""

    def __init__(self, api, zone):
        import threading
        self.api, self.zone = api, zone
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while self.running:
            try:
                query, peer = self.sock.recvfrom(512)
                self.sock.sendto(self.answer(query), peer)
            except (socket.timeout, ValueError, IndexError):
                continue

    def answer(self, query):
        labels, pos = [], 12
        while query[pos]:
            labels.append(query[pos + 1:pos + 1 + query[pos]].decode().lower())
            pos += 1 + query[pos]
        qtype = int.from_bytes(query[pos + 1:pos + 3], "big")
        question = query[12:pos + 5]
        name = ".".join(labels)
        relative = name[:-len(self.zone) - 1] if name.endswith("." + self.zone) else ""
        texts = [r["content"] for r in self.api.find(self.zone, relative, "TXT")] if qtype == 16 else []
        answers = b""
        for text in texts:
            data = bytes([len(text)]) + text.encode()
            answers += b"\xc0\x0c" + (16).to_bytes(2, "big") + (1).to_bytes(2, "big") + \
                (0).to_bytes(4, "big") + len(data).to_bytes(2, "big") + data
        header = query[:2] + b"\x84\x00" + (1).to_bytes(2, "big") + len(texts).to_bytes(2, "big") + \
            b"\x00\x00\x00\x00"
        return header + question + answers

    def stop(self):
        self.running = False
        self.thread.join(5)
        self.sock.close()


def test_acme_dns01_through_dnsimple(workdir, http_port, started):
    from dnsimple_standin import DnsimpleStandin
    with DnsimpleStandin("dnsimple-test-token", zones=(DOMAIN,)) as api:
        dns = StandinDns(api, DOMAIN)
        pebble = Pebble(workdir, dns.port, http_port)
        server = ServerHandle(workdir, extra=[
            "--tunnel-domain", DOMAIN, "--public-address", "127.0.0.1",
            "--dynamic-dns-service", "dnsimple:dnsimple-test-token", "--dnsimple-api-url", api.url,
            "--acme-directory", pebble.directory, "--acme-ca-bundle", pebble.cert,
            "--acme-retry", "1"])
        try:
            pod, pod_dir, fqdn = acme_pod(workdir, server, started)
            assert "challenge=dns-01" in server.proc.stderr()
            created = [path for method, path in api.requests if method == "POST"]
            assert any("/records" in path for path in created)
            # the challenge records are cleared again once validated
            wait_until(lambda: not api.find(DOMAIN, rtype="TXT"), timeout=30, what="TXT records removed")
            root = pebble.root()
            through_sni = curl("https://%s:%d/" % (fqdn, server.https), root, fqdn, server.https)
            assert through_sni.returncode == 0, through_sni.stderr
            assert pod.stop() == 0
        finally:
            assert server.stop() == 0
            pebble.stop()
            dns.stop()


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_dump(url, home, fqdn, timeout=120):
    """(DOM, stderr) of headless Chromium loading url, with HOME (and its NSS db) at home;
    Chromium and its helpers run in a process group of their own, killed on a timeout."""
    import signal
    env = dict(os.environ, HOME=home)
    profile = os.path.join(home, "profile-%d" % len(os.listdir(home)))
    proc = subprocess.Popen(["chromium"] + CHROMIUM_FLAGS + [
        "--user-data-dir=" + profile, "--host-resolver-rules=MAP %s 127.0.0.1" % fqdn,
        "--timeout=20000", "--dump-dom", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # helpers that outlive the browser
        except ProcessLookupError:
            pass
        proc.wait(10)
    return out, err


@pytest.mark.skipif(shutil.which("chromium") is None or shutil.which("certutil") is None,
                    reason="chromium or certutil (libnss3-tools) not installed")
def test_acme_chromium_trusts_the_pod_certificate(workdir, pebble, dns_port, http_port, started):
    server = acme_server(workdir, pebble, http_port, dns_port)
    pod = None
    try:
        pod, pod_dir, fqdn = acme_pod(workdir, server, started)
        home = os.path.join(workdir, "chromium-home")
        nssdb = os.path.join(home, ".pki", "nssdb")
        os.makedirs(nssdb)
        url = "https://%s:%d/browser" % (fqdn, server.https)
        untrusted, why = chromium_dump(url, home, fqdn)  # before pebble's root is imported
        assert "GET /browser HTTP/1.1" not in untrusted and "ERR_CERT_AUTHORITY_INVALID" in why
        empty = os.path.join(home, "empty-password")
        open(empty, "w").write("\n")
        for args in (["-N", "-f", empty], ["-A", "-t", "C,,", "-n", "pebble root", "-i", pebble.root()]):
            subprocess.run(["certutil", "-d", "sql:" + nssdb] + args, check=True, timeout=30,
                           stdin=subprocess.DEVNULL)
        dom, why = chromium_dump(url, home, fqdn)
        assert "GET /browser HTTP/1.1" in dom, why[-2000:]
        port = public_ports(pod_dir)[0]
        dom, why = chromium_dump("https://%s:%d/per-port" % (fqdn, port), home, fqdn)
        assert "GET /per-port HTTP/1.1" in dom, why[-2000:]
    finally:
        if pod is not None:
            assert pod.stop() == 0
        assert server.stop() == 0


def test_acme_update_fetches_the_chain_for_a_pod_that_was_offline(workdir, pebble, dns_port, http_port):
    from helpers import request_json
    server = acme_server(workdir, pebble, http_port, dns_port)
    try:
        pod_dir, _fqdn = https_pod(workdir, server)
        url = server.url + "/tunnels/" + pod_id(pod_dir)
        wait_until(lambda: request_json(url, secret=pod_secret(pod_dir))[1]["acme"]["state"] == "valid",
                   timeout=60, what="the order done while the pod is offline")
        assert not acme_installed(pod_dir)
        done = run_pod(pod_dir, "update")
        assert done.returncode == 0, done.stderr
        assert acme_installed(pod_dir)
        assert "Pebble" not in issuer(os.path.join(pod_dir, "pipe2me.tunnel.cert"))
    finally:
        assert server.stop() == 0


def test_acme_expired_chain_gives_way_to_the_server_certificate(workdir, dns_port, http_port, started):
    pebble = Pebble(workdir, dns_port, http_port, validity_s=6)
    server = acme_server(workdir, pebble, http_port, dns_port)
    try:
        pod, pod_dir, _fqdn = acme_pod(workdir, server, started)
        pebble.stop()  # no renewal can come
        cert, tunnel_cert = (os.path.join(pod_dir, name)
                             for name in ("pipe2me.openssl.cert", "pipe2me.tunnel.cert"))
        wait_until(lambda: open(cert).read() == open(tunnel_cert).read(), timeout=90,
                   what="the server-CA certificate back after the chain expired")
        # the pod's own timer may restore first ("expired"); the server's failed renewal follows
        wait_until(lambda: "ACME=failed" in run_pod(pod_dir, "status").stdout, timeout=60,
                   what="status to say the renewal failed")
    finally:
        assert server.stop() == 0
        pebble.stop()


def test_acme_chain_end_gives_way_even_while_the_server_is_unreachable(
        workdir, dns_port, http_port, started):
    """The pod watches the end of the chain itself: with the server frozen
    (SIGSTOP) before the chain expires, the server-CA certificate is back in
    use at the chain's end and `status` says the certificate expired. The
    pod's dials to the frozen server give up after 2 s, not 10 s."""
    pebble = Pebble(workdir, dns_port, http_port, validity_s=6)
    server = acme_server(workdir, pebble, http_port, dns_port)
    frozen = False
    try:
        pod, pod_dir, _fqdn = acme_pod(workdir, server, started, "--hello-timeout", "2")
        os.kill(server.proc.pid, signal.SIGSTOP)
        frozen = True
        cert, tunnel_cert = (os.path.join(pod_dir, name)
                             for name in ("pipe2me.openssl.cert", "pipe2me.tunnel.cert"))
        wait_until(lambda: open(cert).read() == open(tunnel_cert).read(), timeout=30,
                   what="the server-CA certificate back while the server is frozen")
        pod.wait_for(r"acme certificate expired, server-CA certificate back in use")
        wait_until(lambda: "ACME=expired" in run_pod(pod_dir, "status").stdout, timeout=10,
                   what="status to say the certificate expired")
    finally:
        if frozen:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert server.stop() == 0
        pebble.stop()


OLD_POD_COMMIT = "df6c451"  # a pod from before ACME: no CERT frame, one certificate file


def test_acme_a_pod_from_before_keeps_working_on_its_server_certificate(workdir, pebble, dns_port,
                                                                        http_port, started):
    import sys
    from conftest import ROOT
    shown = subprocess.run(["git", "-C", ROOT, "show", "%s:pipe2me_pod.py" % OLD_POD_COMMIT],
                           capture_output=True, text=True)
    if shown.returncode != 0:
        pytest.skip("commit %s not in this clone" % OLD_POD_COMMIT)
    old_pod = os.path.join(workdir, "old_pod.py")
    with open(old_pod, "w") as fh:
        fh.write(shown.stdout)
    server = acme_server(workdir, pebble, http_port, dns_port)
    try:
        pod_dir = os.path.join(workdir, "old")
        local = free_port()
        setup = subprocess.run([sys.executable, old_pod, "--dir", pod_dir, "setup", "--server",
                                server.url, "--auth", server.token, "--protocols", "https",
                                "--local-ports", str(local)], capture_output=True, text=True, timeout=60)
        assert setup.returncode == 0, setup.stderr
        fqdn = setup.stdout.strip()
        pod = Proc([sys.executable, old_pod, "--dir", pod_dir, "start", "--echo"], workdir, "old-pod")
        started.append(pod)
        pod.wait_for(r"tunnel up")
        # the server orders (its CSR has no SAN, so the CA refuses) and never sends CERT
        server.proc.wait_for(r"acme order failed key=%s" % pod_id(pod_dir), timeout=60)
        assert "pipe2me CA" in issuer(os.path.join(pod_dir, "pipe2me.openssl.cert"))
        ca = os.path.join(pod_dir, "pipe2me.cacert")
        through_sni = curl("https://%s:%d/old" % (fqdn, server.https), ca, fqdn, server.https)
        assert through_sni.returncode == 0 and "GET /old" in through_sni.stdout, through_sni.stderr
        assert pod.alive() and "Traceback" not in pod.stderr()
        assert pod.stderr().count("tunnel up") == 1 and "tunnel down" not in pod.stderr()
        assert pod.stop() == 0
    finally:
        assert server.stop() == 0
