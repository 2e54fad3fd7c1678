"""The control plane end to end: a real server process, real pod setups,
real openssl and curl (issue 2, acceptance points 1-10).

Every server here runs with HOME pointing to a temporary directory, so no
~/pipe2me.server.conf of the machine is read, and with no configuration key
in its environment. State is checked on disk (STATE_DIR/tunnels, ca/issued)
and through the admin commands, not only through the API.
"""

import base64
import calendar
import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from conftest import (clean_env, CONFIG_KEY_NAMES, POD, SERVER, Proc, ServerHandle, ephemeral_ports, free_port_range,
                      wait_until)
from helpers import (DOMAIN, api, cert_fields, cert_sha256, create_tunnel, curl_ok, make_csr, make_key,
                     openssl, request_json)

FQDN_RE = re.compile(r"^[a-z]+-[a-z]+-[a-z]+(-\d+)?\.pipe2\.localhost$")
POD_FILE_NAMES = {"pipe2me.info.inc", "pipe2me.local.inc", "pipe2me.openssl.priv",
                  "pipe2me.openssl.cert", "pipe2me.cacert"}
RUN_TIMEOUT_S = 60


# ---- environment and processes ----------------------------------------------

# bursts of one token's creations, beyond the default MAX_TUNNELS_PER_TOKEN
UNCAPPED = ("--max-tunnels-per-token", "0")


class Server(ServerHandle):
    """A ServerHandle whose process reads no configuration of this machine."""

    def __init__(self, workdir, extra=(), ports=None, state_dir=None, name="server"):
        super().__init__(workdir, extra=extra, env=clean_env(os.path.join(workdir, "home")),
                         ports=ports, state_dir=state_dir, name=name)

    def admin(self, *args, reload=False):
        """Run an admin command on this state dir; with reload, wait for the SIGHUP reload."""
        before = len(self.proc.stderr())
        done = run_server(["--state-dir", self.state_dir] + list(args), self.env)
        if reload and done.returncode == 0:
            self.proc.wait_for(r"reloaded tokens=", after=before)
        return done

    def hup(self):
        """SIGHUP by PID; returns once the server logged the reload."""
        before = len(self.proc.stderr())
        os.kill(self.proc.pid, signal.SIGHUP)
        self.proc.wait_for(r"reloaded tokens=", after=before)

    def tunnel_files(self):
        directory = os.path.join(self.state_dir, "tunnels")
        return sorted(n for n in os.listdir(directory) if n.endswith(".json"))

    def records(self):
        directory = os.path.join(self.state_dir, "tunnels")
        result = {}
        for name in self.tunnel_files():
            with open(os.path.join(directory, name), encoding="utf-8") as fh:
                record = json.load(fh)
            result[record["id"]] = record
        return result

    def tunnels_list(self):
        done = self.admin("tunnels", "list")
        assert done.returncode == 0, done.stderr
        return done.stdout

    def stop_clean(self):
        code = self.stop()
        assert code == 0, self.proc.stderr()[-3000:]


def run_server(args, env, timeout=RUN_TIMEOUT_S):
    return subprocess.run([sys.executable, SERVER] + list(args), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=timeout)


def pod(pod_dir, *args, env=None, cwd=None):
    argv = [sys.executable, POD] + (["--dir", pod_dir] if pod_dir else []) + list(args)
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=env or clean_env(os.path.dirname(os.path.abspath(pod_dir or "."))),
                          cwd=cwd, timeout=RUN_TIMEOUT_S)


def pod_setup(server, pod_dir, token, *extra):
    return pod(pod_dir, "setup", "--server", server.url, "--auth", token, *extra)


def setup_ok(server, pod_dir, token, protocols="http,https", *extra):
    done = pod_setup(server, pod_dir, token, "--protocols", protocols, *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


PROGRESS_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO pipe2me\.pod ")


def assert_one_line_failure(done, fragment=None):
    """The failure is one line (INFO progress lines before it, such as a retry, aside)."""
    assert done.returncode not in (0, 1), (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if not PROGRESS_LINE.match(line)]
    assert len(lines) == 1, done.stderr
    if fragment:
        assert fragment.lower() in lines[0].lower(), lines[0]
    return lines[0]


def read_inc(path):
    """KEY=value lines as sh sees them (sourced by a real sh)."""
    script = 'set -a; . "$1"; set +a; env'
    out = subprocess.run(["sh", "-c", script, "sh", path], capture_output=True, text=True,
                         timeout=30, env={"PATH": os.environ["PATH"]}).stdout
    return dict(line.split("=", 1) for line in out.splitlines()
                if line.startswith("PIPE2ME_") and "=" in line)


def write_tokens(state_dir, lines):
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, "tokens.conf")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))
    return path


# ---- HTTP clients ---------------------------------------------------------------

def assert_json_error(status, body, low=400, high=499):
    assert low <= status <= high, (status, body)
    assert set(body) >= {"error"} and isinstance(body["error"], str), body
    assert body["error"] and "\n" not in body["error"], body
    assert "Traceback" not in body["error"]


def create(server, token, protocols=("http", "https")):
    return create_tunnel(server, token, protocols)


def curl_get(url, *extra):
    """(status, content type, body) of a GET with the real curl."""
    marker = b"\n--curl-meta--"
    out = curl_ok(*extra, "-w", (marker + b"%{http_code} %{content_type}").decode(), url)
    body, _, meta = out.rpartition(marker)
    status, _, ctype = meta.decode().partition(" ")
    return int(status), ctype, body


# ---- fixtures -------------------------------------------------------------------------

class DefaultServer(Server):
    """Started like a fresh install: no config file, default STATE_DIR (~/.pipe2me-server
    under the temporary HOME) and TUNNEL_PORTS; only the listeners are moved to loopback
    and free ports, so that the test needs no fixed port and exposes nothing."""

    def __init__(self, workdir):
        super().__init__(workdir, ports=range(10000, 15000),
                         state_dir=os.path.join(workdir, "home", ".pipe2me-server"))

    def argv(self):
        return [sys.executable, SERVER, "--listen-address", "127.0.0.1",
                "--http-port", "0", "--https-port", "0", "--tunnel-port", "0"]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A server on a fresh state dir without any configuration, and one pod set up with
    the command the server printed: (server, pod dir, setup result)."""
    workdir = str(tmp_path_factory.mktemp("first"))
    server = DefaultServer(workdir)
    pod_dir = os.path.join(workdir, "pod")
    done = pod_setup(server, pod_dir, server.token, "--protocols", "http,https",
                     "--local-ports", "8100,8101")
    yield server, pod_dir, done
    server.stop_clean()


@pytest.fixture
def srv(workdir):
    server = Server(workdir)
    yield server
    server.stop_clean()


# ---- 1. first start, setup --------------------------------------------------------------

def test_start_fresh_without_config_prints_token_and_setup_prints_fqdn(first):
    server, pod_dir, done = first
    out = server.proc.stdout()
    assert re.search(r"^token: p2m-\S{8,}$", out, re.M), out
    command = re.search(r"^pod command: (.*)$", out, re.M).group(1)
    assert "--server http://127.0.0.1:%d --auth %s" % (server.http, server.token) in command
    assert not os.path.exists(os.path.join(server.workdir, "home", "pipe2me.server.conf"))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and done.stdout.endswith("\n"), done.stdout
    assert lines[0].endswith("." + DOMAIN) and FQDN_RE.match(lines[0]), lines[0]


def test_start_defaults_apply_without_config(first):
    server = first[0]
    done = server.admin("check-config")
    assert done.returncode == 0, done.stderr
    assert re.search(r"^TUNNEL_PORTS=10000\.\.14999  # default$", done.stdout, re.M), done.stdout
    assert re.search(r"^TUNNEL_DOMAIN=pipe2\.localhost  # default$", done.stdout, re.M)
    record = list(server.records().values())[0]
    assert all(10000 <= port < 15000 for port in record["ports"]), record["ports"]


def test_start_second_time_prints_no_new_token(workdir):
    server = DefaultServer(workdir)
    token = server.token
    server.stop_clean()
    again = Server(workdir, state_dir=server.state_dir)
    try:
        assert "token:" not in again.proc.stdout()
        fqdn = setup_ok(again, os.path.join(workdir, "pod"), token, "https")
        assert FQDN_RE.match(fqdn)
    finally:
        again.stop_clean()


# ---- 2. the five files and the certificate ------------------------------------------------

def test_setup_writes_five_files_with_private_key_0600(first):
    server, pod_dir, done = first
    assert done.returncode == 0, done.stderr
    assert set(os.listdir(pod_dir)) == POD_FILE_NAMES
    for name in ("pipe2me.openssl.priv", "pipe2me.info.inc"):
        mode = stat.S_IMODE(os.stat(os.path.join(pod_dir, name)).st_mode)
        assert mode == 0o600, (name, oct(mode))
    key = os.path.join(pod_dir, "pipe2me.openssl.priv")
    assert b"ASN1 OID: prime256v1" in openssl("pkey", "-in", key, "-noout", "-text_pub")
    cert = os.path.join(pod_dir, "pipe2me.openssl.cert")
    assert openssl("pkey", "-in", key, "-pubout") == openssl("x509", "-in", cert, "-noout", "-pubkey")


def test_setup_private_key_never_reaches_the_server(first):
    server, pod_dir, _ = first
    with open(os.path.join(pod_dir, "pipe2me.openssl.priv")) as fh:
        key_body = "".join(fh.read().strip().splitlines()[1:-1])
    secret_part = key_body[48:96].encode()  # past the DER header every P-256 key shares
    for root, _, names in os.walk(server.state_dir):
        for name in names:
            with open(os.path.join(root, name), "rb") as fh:
                assert secret_part not in fh.read(), name
    assert secret_part.decode() not in server.proc.stderr()


def test_cert_verifies_and_names_only_the_fqdn(first):
    _, pod_dir, done = first
    fqdn = done.stdout.strip()
    cert = os.path.join(pod_dir, "pipe2me.openssl.cert")
    cacert = os.path.join(pod_dir, "pipe2me.cacert")
    verified = subprocess.run(["openssl", "verify", "-CAfile", cacert, cert],
                              capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    for purpose in ("sslserver", "sslclient"):
        verified = subprocess.run(["openssl", "verify", "-purpose", purpose, "-CAfile", cacert,
                                   cert], capture_output=True, text=True, timeout=60)
        assert verified.returncode == 0, (purpose, verified.stdout + verified.stderr)
    fields = cert_fields(cert)
    assert fields["subject"] == "CN=" + fqdn
    assert fields["Subject Alternative Name"] == "DNS:" + fqdn
    assert fields["Basic Constraints"] == "CA:FALSE"
    assert fields["Extended Key Usage"] == \
        "TLS Web Server Authentication, TLS Web Client Authentication"
    assert "Certificate Sign" not in fields["Key Usage"]
    assert "Digital Signature" in fields["Key Usage"]


def test_cert_ends_no_later_than_the_tunnel(first):
    _, pod_dir, _ = first
    info = read_inc(os.path.join(pod_dir, "pipe2me.info.inc"))
    cert = os.path.join(pod_dir, "pipe2me.openssl.cert")
    end = cert_fields(cert)["notAfter"]
    not_after = calendar.timegm(time.strptime(end, "%Y-%m-%d %H:%M:%SZ"))
    assert not_after <= int(info["PIPE2ME_EXPIRES_AT"]) + 1


# ---- 3. env --------------------------------------------------------------------------------

def eval_env(pod_dir):
    """`eval $(python3 pipe2me_pod.py env)` in sh, run inside the pod dir; the PIPE2ME_ vars."""
    script = 'eval $(%s %s env)\nset | grep "^PIPE2ME_" || true' % (
        shlex.quote(sys.executable), shlex.quote(POD))
    env = clean_env(os.path.dirname(pod_dir))
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, cwd=pod_dir,
                         env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    values = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        values[key] = shlex.split(value)[0] if value else ""
    return values


def test_env_eval_sets_variables_with_ports_in_range(first):
    server, pod_dir, done = first
    fqdn = done.stdout.strip()
    values = eval_env(pod_dir)
    assert values["PIPE2ME_FQDN"] == fqdn
    assert re.fullmatch(r"[0-9a-f]{16}", values["PIPE2ME_ID"])
    assert values["PIPE2ME_SERVER"] == server.url
    assert values["PIPE2ME_TUNNEL"] == "127.0.0.1:%d" % server.tunnel
    assert values["PIPE2ME_LOCAL_PORTS"] == "8100,8101"
    assert "PIPE2ME_SECRET" not in values and "PIPE2ME_URLS_2" not in values
    ports = []
    for index, scheme in enumerate(("http", "https")):
        match = re.fullmatch(r"%s://%s:(\d+)" % (scheme, re.escape(fqdn)),
                             values["PIPE2ME_URLS_%d" % index])
        assert match, values["PIPE2ME_URLS_%d" % index]
        ports.append(int(match.group(1)))
    assert len(set(ports)) == 2 and all(10000 <= p < 15000 for p in ports), ports
    record = server.records()[values["PIPE2ME_ID"]]
    assert record["ports"] == ports and record["fqdn"] == fqdn


def test_env_one_protocol_tunnel_has_no_second_url(first, tmp_path):
    server = first[0]
    pod_dir = str(tmp_path / "one")
    fqdn = setup_ok(server, pod_dir, server.token, "https")
    values = eval_env(pod_dir)
    assert re.fullmatch(r"https://%s:\d+" % re.escape(fqdn), values["PIPE2ME_URLS_0"])
    assert "PIPE2ME_URLS_1" not in values
    port = int(values["PIPE2ME_URLS_0"].rsplit(":", 1)[1])
    assert 10000 <= port < 15000
    assert values["PIPE2ME_LOCAL_PORTS"] == str(port)  # local ports default to the public ones


# ---- 4. verify ---------------------------------------------------------------------------------

def test_verify_prints_fqdn_while_online(first):
    _, pod_dir, done = first
    result = pod(pod_dir, "verify")
    assert result.returncode == 0, result.stderr
    assert result.stdout == done.stdout


def test_verify_reports_expired_after_the_lifespan(srv, workdir):
    added = srv.admin("tokens", "add", "short-lived", "lifespan:3", "max_ports:2", reload=True)
    assert added.returncode == 0 and added.stdout.strip() == "short-lived", added.stderr
    pod_dir = os.path.join(workdir, "pod")
    fqdn = setup_ok(srv, pod_dir, "short-lived", "http,https")
    expires_at = int(read_inc(os.path.join(pod_dir, "pipe2me.info.inc"))["PIPE2ME_EXPIRES_AT"])
    record = list(srv.records().values())[0]
    assert expires_at == record["created_at"] + 3
    online = pod(pod_dir, "verify")
    assert online.returncode == 0 and online.stdout.strip() == fqdn, online.stderr

    def expired():
        result = pod(pod_dir, "verify")
        return result if result.returncode != 0 else None
    result = wait_until(expired, timeout=10, interval=0.2, what="verify to fail")
    assert time.time() >= expires_at  # not before the lifespan ran out
    line = assert_one_line_failure(result, "expired")
    assert fqdn in line and result.stdout == ""
    assert result.returncode == 4


# ---- 5. setup refusals change nothing on the server -----------------------------------------

GOOD = "good-token-0001"
ONE_PORT = "one-port-token"


@pytest.fixture
def quiet_server(workdir):
    """A server with two known tokens and a small port range."""
    state_dir = os.path.join(workdir, "state")
    write_tokens(state_dir, ["%s = max_ports:2 lifespan:1h" % GOOD,
                             "%s = max_ports:1 lifespan:1h" % ONE_PORT])
    server = Server(workdir, ports=free_port_range(8))
    yield server
    server.stop_clean()


def snapshot(server):
    return server.tunnel_files(), server.tunnels_list()


REFUSALS = {
    "invalid-token": (["--auth", "no-such-token-here", "--protocols", "http"], "invalid token"),
    "no-token": (["--protocols", "http"], "token"),
    "empty-token": (["--auth", "", "--protocols", "http"], "token"),
    "too-many-ports": (["--auth", ONE_PORT, "--protocols", "http,https"], "allows 1"),
    "port-count-mismatch": (["--auth", GOOD, "--protocols", "http,https", "--local-ports", "8100"],
                            "one port per protocol"),
    "protocol-unknown": (["--auth", GOOD, "--protocols", "http,gopher"], "gopher"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_setup_refusal_takes_nothing_on_the_server(quiet_server, workdir, case):
    args, fragment = REFUSALS[case]
    before = snapshot(quiet_server)
    assert before[0] == [] and before[1].splitlines()[1:] == []  # the header row only
    pod_dir = os.path.join(workdir, "refused")
    done = pod(pod_dir, "setup", "--server", quiet_server.url, *args)
    assert_one_line_failure(done, fragment)
    assert done.stdout == ""
    assert not os.path.exists(pod_dir) or os.listdir(pod_dir) == []
    assert snapshot(quiet_server) == before
    first_ports = list(quiet_server.tunnel_ports[:2])
    fqdn = setup_ok(quiet_server, os.path.join(workdir, "next"), GOOD, "http,https")
    record = list(quiet_server.records().values())[0]
    assert record["fqdn"] == fqdn and record["ports"] == first_ports
    assert "Traceback" not in quiet_server.proc.stderr()


def test_setup_refuses_a_dir_holding_a_setup_and_keeps_it(quiet_server, workdir):
    pod_dir = os.path.join(workdir, "pod")
    fqdn = setup_ok(quiet_server, pod_dir, GOOD, "http,https")
    files_before = {n: open(os.path.join(pod_dir, n), "rb").read() for n in os.listdir(pod_dir)}
    before = snapshot(quiet_server)
    done = pod_setup(quiet_server, pod_dir, GOOD, "--protocols", "http,https")
    assert_one_line_failure(done, "already holds a setup")
    assert done.stdout == ""
    assert {n: open(os.path.join(pod_dir, n), "rb").read() for n in os.listdir(pod_dir)} \
        == files_before
    assert snapshot(quiet_server) == before
    verified = pod(pod_dir, "verify")
    assert verified.returncode == 0 and verified.stdout.strip() == fqdn
    taken = quiet_server.records()[read_inc(os.path.join(pod_dir, "pipe2me.info.inc"))
                                   ["PIPE2ME_ID"]]["ports"]
    setup_ok(quiet_server, os.path.join(workdir, "next"), GOOD, "http,https")
    new = [r for r in quiet_server.records().values() if r["fqdn"] != fqdn][0]
    assert taken == list(quiet_server.tunnel_ports[:2])
    assert new["ports"] == list(quiet_server.tunnel_ports[2:4])


API_REFUSALS = {
    "not-json": (b"{not json", 400),
    "not-an-object": (b"[1, 2]", 400),
    "no-token": (json.dumps({"protocols": ["http"]}).encode(), 401),
    "invalid-token": (json.dumps({"token": "nope-nope", "protocols": ["http"]}).encode(), 403),
    "unknown-protocol": (json.dumps({"token": GOOD, "protocols": ["http", "ftp"]}).encode(), 400),
    "empty-protocols": (json.dumps({"token": GOOD, "protocols": []}).encode(), 400),
    "too-many-ports": (json.dumps({"token": ONE_PORT, "protocols": ["http", "ssh"]}).encode(), 422),
}


def test_api_create_refusals_are_json_4xx_and_change_nothing(quiet_server):
    before = snapshot(quiet_server)
    for case, (raw, expected) in sorted(API_REFUSALS.items()):
        status, body = request_json(quiet_server.url + "/tunnels", "POST", raw=raw)
        assert status == expected, (case, status, body)
        assert_json_error(status, body)
    assert snapshot(quiet_server) == before
    status, body = create(quiet_server, GOOD)
    assert status == 201 and body["ports"] == list(quiet_server.tunnel_ports[:2]), body
    assert "Traceback" not in quiet_server.proc.stderr()


def test_api_body_with_a_lone_surrogate_is_a_400_not_a_dropped_connection(quiet_server):
    """JSON may escape half a UTF-16 pair ("\\ud800"): no text, so no secret to hash."""
    status, body = create(quiet_server, GOOD)
    assert status == 201, body
    raw = b'{"secret": "\\ud800", "proxy_protocol": "v1", "csr": "x"}'
    for method, path in (("PATCH", ""), ("POST", "/cert"), ("POST", "/extend"), ("POST", "/check")):
        url = quiet_server.url + "/tunnels/" + body["id"] + path
        answer = request_json(url, method, raw=raw)
        assert answer[0] == 400, (path, answer)
        assert_json_error(*answer)
    assert "Traceback" not in quiet_server.proc.stderr()


def test_api_too_many_bad_tokens_get_429(quiet_server):
    statuses = [create(quiet_server, "wrong-token-%d" % i)[0] for i in range(10)]
    assert statuses == [403] * 10
    status, body = create(quiet_server, GOOD)
    assert status == 429, body
    assert_json_error(status, body)
    assert quiet_server.tunnel_files() == []


# ---- 6. the CA refuses CSRs that ask for more than the tunnel's name -------------------------

def issued_certs(state_dir):
    directory = os.path.join(state_dir, "ca", "issued")
    return sorted(os.path.join(directory, n) for n in os.listdir(directory))


def test_cert_refuses_bad_csrs_and_signs_any_other_for_the_tunnel_name_only(srv, tmp_path):
    status, tunnel = create(srv, srv.token, ["https"])
    assert status == 201, tunnel
    fqdn, secret = tunnel["fqdn"], tunnel["secret"]
    url = "%s/tunnels/%s/cert" % (srv.url, tunnel["id"])
    ec = make_key(tmp_path / "ec.pem")
    rsa1024 = make_key(tmp_path / "rsa1024.pem", "rsa1024")
    bad = {  # case: (CSR, what the one-line reason must mention)
        "rsa-1024": (make_csr(rsa1024, "/CN=" + fqdn), "1024-bit"),
        "not-pem": ("this is not a certificate request", "PEM"),
        "der-base64": (base64.b64encode(make_csr(ec, "/CN=" + fqdn, outform="DER")).decode(),
                       "PEM"),
        "empty": ("", "csr"),
    }
    issued_before = issued_certs(srv.state_dir)
    record_before = srv.records()[tunnel["id"]]
    for case, (csr, fragment) in sorted(bad.items()):
        status, body = request_json(url, "POST", {"csr": csr}, secret=secret)
        assert status == 400, (case, status, body)
        assert_json_error(status, body)
        assert fragment.lower() in body["error"].lower(), (case, body)
    assert issued_certs(srv.state_dir) == issued_before
    assert srv.records()[tunnel["id"]] == record_before
    good = make_csr(ec, "/CN=" + fqdn)
    for secret_given, expected in ((None, 401), ("wrong-secret", 401)):
        status, body = request_json(url, "POST", {"csr": good}, secret=secret_given)
        assert status == expected, body
        assert_json_error(status, body)
    status, body = request_json(url.replace(tunnel["id"], "0" * 16), "POST", {"csr": good},
                             secret=secret)
    assert status == 404, body
    status, body = request_json(url, "POST", {"csr": good}, secret=secret)
    assert status == 200 and body["not_after"] <= tunnel["expires_at"], body
    leaf = tmp_path / "leaf.pem"
    leaf.write_text(body["cert"])
    assert cert_fields(str(leaf))["Subject Alternative Name"] == "DNS:" + fqdn
    assert srv.records()[tunnel["id"]]["cert_sha256"] == [cert_sha256(body["cert"])]
    beyond = {  # whatever else they ask, signed for the tunnel's name only
        "other-name": make_csr(ec, "/CN=other-name-here." + DOMAIN),
        "other-name-in-san": make_csr(ec, "/CN=" + fqdn, "subjectAltName=DNS:evil." + DOMAIN),
        "extra-san": make_csr(ec, "/CN=" + fqdn, "subjectAltName=DNS:%s,DNS:evil.example" % fqdn),
        "extra-ip-san": make_csr(ec, "/CN=" + fqdn, "subjectAltName=DNS:%s,IP:127.0.0.1" % fqdn),
        "ca-true": make_csr(ec, "/CN=" + fqdn, "basicConstraints=critical,CA:TRUE"),
    }
    for case, csr in sorted(beyond.items()):
        status, body = request_json(url, "POST", {"csr": csr}, secret=secret)
        assert status == 200, (case, status, body)
        leaf.write_text(body["cert"])
        fields = cert_fields(str(leaf))
        assert (fields["subject"], fields["Subject Alternative Name"], fields["Basic Constraints"]) \
            == ("CN=" + fqdn, "DNS:" + fqdn, "CA:FALSE"), (case, fields)
    assert "Traceback" not in srv.proc.stderr()


def test_cert_every_issued_cert_names_only_its_tunnel(srv, workdir):
    fqdns = {setup_ok(srv, os.path.join(workdir, "pod%d" % i), srv.token, "https")
             for i in range(2)}
    records = srv.records()
    fingerprints = {fp: r["fqdn"] for r in records.values() for fp in r["cert_sha256"]}
    server_fp = cert_sha256(os.path.join(srv.state_dir, "ca", "server.pem"))
    leaves = 0
    for path in issued_certs(srv.state_dir):
        fp = cert_sha256(path)
        if fp == server_fp:
            continue
        leaves += 1
        fields = cert_fields(path)
        fqdn = fingerprints[fp]
        assert fqdn in fqdns
        assert fields["subject"] == "CN=" + fqdn
        assert fields["Subject Alternative Name"] == "DNS:" + fqdn
        assert fields["Basic Constraints"] == "CA:FALSE"
    assert leaves == 2


# ---- 7. concurrency and crashes ------------------------------------------------------------------

def burst_create(url, token, count, protocols=("http", "https"), sources=10):
    """`count` POST /tunnels at once from threads, spread over `sources` loopback
    addresses (the API serves only a few requests per address at once); their
    (status, body) in order."""
    barrier = threading.Barrier(count)
    results = [None] * count

    def worker(index):
        barrier.wait(timeout=20)
        try:
            results[index] = request_json(url + "/tunnels", "POST",
                                          {"token": token, "protocols": list(protocols)},
                                          source="127.0.0.%d" % (2 + index % sources), timeout=30)
        except (OSError, ValueError) as exc:
            results[index] = (None, repr(exc))
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads)
    return results


def assert_disjoint_ports(records, tunnel_ports):
    seen = {}
    for record in records:
        for port in record["ports"]:
            assert port in tunnel_ports, (port, record["id"])
            assert port not in seen, "port %d given to %s and %s" % (port, seen[port], record["id"])
            seen[port] = record["id"]
    return seen


def test_store_50_concurrent_creations_are_distinct(workdir):
    server = Server(workdir, ports=free_port_range(110), extra=UNCAPPED)
    try:
        assert server.admin("tokens", "add", "burst-token", "max_ports:2", "lifespan:1h",
                            reload=True).returncode == 0
        results = burst_create(server.url, "burst-token", 50)
        assert [status for status, _ in results] == [201] * 50, \
            [r for r in results if r[0] != 201][:3]
        bodies = [body for _, body in results]
        assert len({b["fqdn"] for b in bodies}) == 50
        assert len({b["id"] for b in bodies}) == 50
        assert all(len(b["ports"]) == 2 for b in bodies)
        assert len(assert_disjoint_ports(bodies, server.tunnel_ports)) == 100
        on_disk = server.records()
        assert len(on_disk) == 50
        for body in bodies:
            assert (on_disk[body["id"]]["fqdn"], on_disk[body["id"]]["ports"]) == \
                (body["fqdn"], body["ports"])
    finally:
        server.stop_clean()


class Burst:
    """Threads creating tunnels in a loop until stopped (or `per_thread` each)."""

    def __init__(self, url, token, threads=6, per_thread=60):
        self.url, self.token, self.per_thread = url, token, per_thread
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.created, self.failed = [], []
        self.threads = [threading.Thread(target=self.run) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def run(self):
        for _ in range(self.per_thread):
            if self.stop.is_set():
                return
            try:
                status, body = request_json(self.url + "/tunnels", "POST",
                                         {"token": self.token, "protocols": ["http", "https"]},
                                         timeout=15)
            except (OSError, ValueError, AssertionError) as exc:
                with self.lock:
                    self.failed.append(repr(exc))
                return
            with self.lock:
                (self.created if status == 201 else self.failed).append(body)

    def count(self):
        with self.lock:
            return len(self.created)

    def finish(self):
        """Stop the threads and wait for them; how many were still running when told to."""
        running = sum(t.is_alive() for t in self.threads)
        self.stop.set()
        for thread in self.threads:
            thread.join(40)
        assert not any(t.is_alive() for t in self.threads)
        return running


@pytest.mark.slow
def test_store_sigkill_during_burst_keeps_completed_tunnels(workdir):
    server = Server(workdir, ports=free_port_range(760), extra=UNCAPPED)
    try:
        assert server.admin("tokens", "add", "crash-token", "max_ports:2", "lifespan:1h",
                            reload=True).returncode == 0
        pods = {}
        for i in range(3):  # full setups, certificates signed before the kill
            pod_dir = os.path.join(workdir, "pod%d" % i)
            pods[pod_dir] = setup_ok(server, pod_dir, "crash-token", "http,https")
        late = [Proc([sys.executable, POD, "--dir", os.path.join(workdir, "late%d" % i), "setup",
                      "--server", server.url, "--auth", "crash-token", "--protocols", "http,https"],
                     workdir, "late%d" % i, env=clean_env(os.path.join(workdir, "home")))
                for i in range(3)]
        burst = Burst(server.url, "crash-token")
        wait_until(lambda: burst.count() >= 20, timeout=30, what="20 creations in the burst")
        os.kill(server.proc.pid, signal.SIGKILL)
        assert burst.finish() > 0, "the burst had ended before the kill"
        server.proc.popen.wait(10)
        for proc in late:
            proc.popen.wait(60)
            if proc.popen.returncode == 0:
                pods[os.path.join(workdir, proc.name)] = proc.stdout().strip()
        server.start(fixed_ports=True)
        assert "unreadable" not in server.proc.stderr()
        records = server.records()  # every file parses
        assert_disjoint_ports(records.values(), server.tunnel_ports)
        assert len(server.tunnels_list().splitlines()) == len(records) + 1  # and the header
        for body in burst.created:
            record = records[body["id"]]
            assert (record["fqdn"], record["ports"]) == (body["fqdn"], body["ports"])
            status, shown = request_json("%s/tunnels/%s" % (server.url, body["id"]),
                                      secret=body["secret"])
            assert status == 200 and shown["ports"] == body["ports"], shown
        assert len(pods) >= 3
        for pod_dir, fqdn in pods.items():
            info = read_inc(os.path.join(pod_dir, "pipe2me.info.inc"))
            record = records[info["PIPE2ME_ID"]]
            assert record["fqdn"] == fqdn
            assert [u.rsplit(":", 1)[1] for u in (info["PIPE2ME_URLS_0"], info["PIPE2ME_URLS_1"])] \
                == [str(p) for p in record["ports"]]
            fingerprint = cert_sha256(os.path.join(pod_dir, "pipe2me.openssl.cert"))
            assert fingerprint in record["cert_sha256"]
            verified = pod(pod_dir, "verify")
            assert verified.returncode == 0 and verified.stdout.strip() == fqdn, verified.stderr
        status, body = create(server, "crash-token")
        assert status == 201, body
        assert_disjoint_ports(list(records.values()) + [body], server.tunnel_ports)
    finally:
        server.stop_clean()


# ---- 8. unique tokens --------------------------------------------------------------------------

def test_setup_waits_out_a_busy_api_share_and_succeeds(workdir):
    """With its address's API share taken (a request whose body never comes),
    setup is answered 429 "retry in a second", says so, tries again, and
    succeeds once the share is free."""
    server, setup = Server(workdir, ["--api-connections-per-source", "1"]), None
    try:
        holder = socket.create_connection(("127.0.0.1", server.http), timeout=10)
        try:
            holder.sendall(("POST /tunnels HTTP/1.1\r\nHost: %s\r\nContent-Length: 100\r\n\r\n{"
                            % DOMAIN).encode())
            wait_until(lambda: api(server, "GET", "/config").status == 429, timeout=10)
            setup = Proc([sys.executable, POD, "--dir", os.path.join(workdir, "pod"), "setup",
                          "--server", server.url, "--auth", server.token, "--protocols", "tcp"],
                         workdir, "setup", env=clean_env(os.path.join(workdir, "home")))
            setup.wait_for(r"INFO pipe2me\.pod server busy, retrying in \d\.\d s", timeout=20)
            assert setup.popen.poll() is None, setup.stderr()
        finally:
            holder.close()
        assert setup.popen.wait(30) == 0, setup.stderr()
        assert FQDN_RE.match(setup.stdout().strip()), setup.stdout()
    finally:
        if setup is not None:
            setup.stop()
        server.stop_clean()


@pytest.mark.slow
def test_token_unique_used_by_20_parallel_setups_succeeds_once(srv, workdir):
    assert srv.admin("tokens", "add", "only-once", "unique:true", "max_ports:2",
                     reload=True).returncode == 0
    env = clean_env(os.path.join(workdir, "home"))
    procs = [Proc([sys.executable, POD, "--dir", os.path.join(workdir, "pod%02d" % i), "setup",
                   "--server", srv.url, "--auth", "only-once", "--protocols", "http,https"],
                  workdir, "pod%02d" % i, env=env) for i in range(20)]
    deadline = time.monotonic() + 60
    for proc in procs:
        proc.popen.wait(max(0.1, deadline - time.monotonic()))
    winners = [p for p in procs if p.popen.returncode == 0]
    assert len(winners) == 1, [(p.name, p.popen.returncode, p.stderr()) for p in procs]
    for proc in procs:
        if proc is winners[0]:
            continue
        done = subprocess.CompletedProcess(proc.argv, proc.popen.returncode, proc.stdout(),
                                           proc.stderr())
        assert_one_line_failure(done, "used")
        assert done.stdout == ""
        assert not os.path.exists(os.path.join(workdir, proc.name))
    assert len(srv.tunnel_files()) == 1
    srv.restart(signal.SIGTERM)
    done = pod_setup(srv, os.path.join(workdir, "after-restart"), "only-once")
    assert_one_line_failure(done, "used")
    assert len(srv.tunnel_files()) == 1


def test_token_unique_stays_used_when_crash_lost_used_tokens_file(srv, workdir):
    """The tunnel file is written first and records the token's single use, so
    a crash before used_tokens.json is written cannot make the token usable again."""
    assert srv.admin("tokens", "add", "once-only", "unique:true", reload=True).returncode == 0
    assert setup_ok(srv, os.path.join(workdir, "pod-a"), "once-only", "https")
    srv.proc.stop(signal.SIGKILL)
    os.unlink(os.path.join(srv.state_dir, "used_tokens.json"))
    srv.start(fixed_ports=True)
    done = pod_setup(srv, os.path.join(workdir, "pod-b"), "once-only")
    assert_one_line_failure(done, "used")
    assert len(srv.tunnel_files()) == 1


# ---- 9. configuration refused at start -----------------------------------------------------------

def start_fails(workdir, args, conf_lines=None, conf_in_home=False):
    """Run the server expecting it to refuse to start: (exit code, stderr, config path)."""
    home = os.path.join(workdir, "home")
    env = clean_env(home)
    path = None
    if conf_lines is not None:
        path = os.path.join(home if conf_in_home else workdir, "pipe2me.server.conf")
        with open(path, "w") as fh:
            fh.write("".join(line + "\n" for line in conf_lines))
        if not conf_in_home:
            args = ["--config", path] + list(args)
    done = run_server(["--state-dir", os.path.join(workdir, "state"), "--listen-address",
                       "127.0.0.1"] + list(args), env, timeout=30)
    assert "pipe2me.server ready" not in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stderr, path


@pytest.mark.parametrize("in_home", [False, True])
def test_config_unknown_key_refused_with_file_and_line(workdir, in_home):
    conf = ["# a comment", "TUNNEL_DOMAIN=pipe2.localhost", "", "TUNEL_PORTS=10000...15000"]
    code, err, path = start_fails(workdir, ["--http-port", "0"], conf, conf_in_home=in_home)
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "%s:4" % path in lines[0] and "TUNEL_PORTS" in lines[0], lines[0]
    assert not os.path.exists(os.path.join(workdir, "state", "tokens.conf"))


@pytest.mark.parametrize("value", ["15000...10000", "10000-15000", "abc", "60000...70000",
                                   "10000...10000"])
def test_config_bad_tunnel_ports_refused_with_file_and_line(workdir, value):
    conf = ["HTTP_PORT=0", "TUNNEL_PORTS=%s" % value]
    code, err, path = start_fails(workdir, [], conf)
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "%s:2" % path in lines[0] and "TUNNEL_PORTS" in lines[0], lines[0]


def test_config_tunnel_ports_in_the_ephemeral_range_warned_once_at_start(workdir):
    first, last = ephemeral_ports()
    inside = Server(os.path.join(workdir, "a"), ports=range(first, first + 10))
    outside = Server(os.path.join(workdir, "b"), ports=free_port_range(10))
    try:
        warned = [l for l in inside.proc.stderr().splitlines() if "ephemeral ports" in l]
        assert len(warned) == 1 and "%d..%d" % (first, last) in warned[0], inside.proc.stderr()
        assert " WARNING pipe2me.server TUNNEL_PORTS " in warned[0]  # the pod's line format
        assert "ephemeral ports" not in outside.proc.stderr()
        assert re.search(r"^\S+ \S+ INFO pipe2me.server ready ", outside.proc.stderr(), re.M)
    finally:
        inside.stop_clean()
        outside.stop_clean()


def test_config_bad_flag_refused_naming_the_flag(workdir):
    code, err, _ = start_fails(workdir, ["--tunnel-ports", "1...1"])
    assert code == 2
    assert len(err.splitlines()) == 1 and "--tunnel-ports" in err, err


@pytest.mark.parametrize("flag", ["--http-port", "--https-port", "--tunnel-port"])
def test_config_port_in_use_refused_naming_the_port(workdir, flag):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        args = ["--http-port", "0", "--https-port", "0", "--tunnel-port", "0"]
        args[args.index(flag) + 1] = str(port)
        public = free_port_range(4)
        code, err, _ = start_fails(workdir, args + ["--tunnel-ports", "%d...%d" % (
            public[0], public[-1] + 1)])
    assert code == 3
    reasons = [line for line in err.splitlines() if line.startswith("pipe2me_server:")]
    assert len(reasons) == 1 and str(port) in reasons[0], err
    # the operator never saw a token: the next start must print one
    server = Server(workdir)
    try:
        assert re.search(r"^token: \S+$", server.proc.stdout(), re.M), server.proc.stdout()
        setup_ok(server, os.path.join(workdir, "pod"), server.token, "https")
    finally:
        server.stop_clean()


def test_config_second_server_on_same_state_dir_refused(srv, workdir):
    tokens_before = open(os.path.join(srv.state_dir, "tokens.conf")).read()
    done = run_server(["--state-dir", srv.state_dir, "--listen-address", "127.0.0.1",
                       "--http-port", "0", "--https-port", "0", "--tunnel-port", "0",
                       "--tunnel-ports", "%d...%d" % (srv.tunnel_ports[0], srv.tunnel_ports[-1] + 1)],
                      srv.env, timeout=30)
    assert done.returncode == 3
    assert "Traceback" not in done.stderr and "pipe2me.server ready" not in done.stderr
    reasons = [line for line in done.stderr.splitlines() if line.startswith("pipe2me_server:")]
    assert len(reasons) == 1 and srv.state_dir in reasons[0], done.stderr
    assert "token:" not in done.stdout
    assert open(os.path.join(srv.state_dir, "tokens.conf")).read() == tokens_before
    assert srv.proc.alive()
    setup_ok(srv, os.path.join(workdir, "pod"), srv.token, "https")


# ---- 10. signals ---------------------------------------------------------------------------------

def test_signal_sigterm_exits_0_without_traceback(srv, workdir):
    setup_ok(srv, os.path.join(workdir, "pod"), srv.token, "http,https")
    idle = socket.create_connection(("127.0.0.1", srv.http), timeout=5)
    try:
        code = srv.proc.stop(signal.SIGTERM, timeout=15)
    finally:
        idle.close()
    assert code == 0
    err = srv.proc.stderr()
    assert "Traceback" not in err and re.search(r"pipe2me\.server stopped$", err, re.M), err
    srv.start(fixed_ports=True)  # the fixture stops it again


def test_signal_sighup_reloads_tokens_file(srv, workdir):
    path = os.path.join(srv.state_dir, "tokens.conf")
    pid = srv.proc.pid
    with open(path, "a") as fh:
        fh.write("handmade-token = max_ports:2 lifespan:1h\n"
                 "broken line without equals\n")
    refused = pod_setup(srv, os.path.join(workdir, "before"), "handmade-token")
    assert_one_line_failure(refused, "invalid token")
    before = len(srv.proc.stderr())
    srv.hup()
    assert re.search(r"bad token line skipped at %s:\d+" % re.escape(path),
                     srv.proc.stderr()[before:])
    fqdn = setup_ok(srv, os.path.join(workdir, "after"), "handmade-token", "http,https")
    assert FQDN_RE.match(fqdn)
    assert srv.proc.pid == pid and srv.proc.alive()
    setup_ok(srv, os.path.join(workdir, "old-token"), srv.token, "https")  # still loaded


def test_signal_sighup_during_creations_loses_no_tunnel(workdir):
    server = Server(workdir, ports=free_port_range(500), extra=UNCAPPED)
    try:
        assert server.admin("tokens", "add", "hup-token", "max_ports:2", "lifespan:1h",
                            reload=True).returncode == 0
        burst = Burst(server.url, "hup-token", threads=4, per_thread=50)
        for _ in range(15):
            server.hup()
        burst.finish()
        assert not burst.failed, burst.failed[:3]
        records = server.records()
        assert_disjoint_ports(records.values(), server.tunnel_ports)
        status, body = create(server, "hup-token")
        assert status == 201, body
        assert_disjoint_ports(list(records.values()) + [body], server.tunnel_ports)
    finally:
        server.stop_clean()


# ---- admin commands ----------------------------------------------------------------------------

def test_admin_tokens_list_shows_names_and_remove_revokes(srv, workdir):
    """`tokens list` is an admin command on the server's own machine: it shows
    the names, which `tokens remove NAME` needs (issue 12 point 6)."""
    assert srv.admin("tokens", "add", "second-token-secret", "max_ports:3",
                     reload=True).returncode == 0
    done = srv.admin("tokens", "list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    assert lines[0].startswith(srv.token + " = ") and "max_ports:4" in lines[0]
    assert lines[1].startswith("second-token-secret = ") and "max_ports:3" in lines[1]
    removed = srv.admin("tokens", "remove", "second-token-secret", reload=True)
    assert removed.returncode == 0, removed.stderr
    refused = pod_setup(srv, os.path.join(workdir, "pod"), "second-token-secret")
    assert_one_line_failure(refused, "invalid token")
    missing = srv.admin("tokens", "remove", "second-token-secret")
    assert_one_line_failure(missing, "no such token")


def test_admin_tunnels_list_show_remove(srv, workdir):
    pod_dir = os.path.join(workdir, "pod")
    fqdn = setup_ok(srv, pod_dir, srv.token, "http,https")
    tunnel_id = read_inc(os.path.join(pod_dir, "pipe2me.info.inc"))["PIPE2ME_ID"]
    status, other = create(srv, srv.token, ["ssh"])
    assert status == 201
    other_line = [line for line in srv.tunnels_list().splitlines() if line.startswith(other["id"])]
    other_line = other_line[0] if other_line else None
    header, *rows = srv.tunnels_list().splitlines()
    assert header.split() == ["ID", "FQDN", "EXPIRED", "CONNECTED", "SINCE", "SERVICES"]
    listing = sorted(rows, key=lambda line: line != other_line)
    assert len(listing) == 2
    record = srv.records()[tunnel_id]
    assert re.match(r"%s\s+%s\s+no\s+no\s+-\s+http:%d,https:%d$" % (
        tunnel_id, re.escape(fqdn), record["ports"][0], record["ports"][1]), listing[1]), listing
    assert re.match(r"%s\s+%s\s+no\s+no\s+-\s+ssh:%d$" % (
        other["id"], re.escape(other["fqdn"]), other["ports"][0]), listing[0]), listing
    shown = srv.admin("tunnels", "show", tunnel_id)
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert view["fqdn"] == fqdn and view["ports"] == record["ports"]
    assert view["status"] == "online"
    assert not any("secret" in key or "token" in key for key in view)
    secret = read_inc(os.path.join(pod_dir, "pipe2me.info.inc"))["PIPE2ME_SECRET"]
    assert secret not in shown.stdout
    assert_one_line_failure(srv.admin("tunnels", "show", "0123456789abcdef"), "no tunnel")
    assert_one_line_failure(srv.admin("tunnels", "show", "../../etc/passwd"), "no tunnel")
    removed = srv.admin("tunnels", "remove", tunnel_id, reload=True)
    assert removed.returncode == 0 and fqdn in removed.stdout, removed.stderr
    gone = pod(pod_dir, "verify")
    line = assert_one_line_failure(gone, "unknown")
    assert fqdn in line
    assert srv.tunnels_list().splitlines()[1:] == listing[:1]
    status, again = create(srv, srv.token, ["http", "https"])
    assert status == 201 and again["ports"] == record["ports"]  # the ports went back to the pool


def test_admin_check_config_prints_every_key_with_origin(workdir, server_mod):
    home = os.path.join(workdir, "home")
    env = clean_env(home)
    with open(os.path.join(home, "pipe2me.server.conf"), "w") as fh:
        fh.write("# settings\nTUNNEL_DOMAIN='example.test'\n"
                 "DYNAMIC_DNS_SERVICE=dnsimple:VerySecretApiToken123\n")
    env["HTTPS_PORT"] = "9443"
    done = run_server(["--http-port", "9080", "check-config"], env)
    assert done.returncode == 0, done.stderr
    keys = [line.split("=", 1)[0] for line in done.stdout.splitlines()]
    assert keys == list(server_mod.CONFIG_KEYS)
    assert set(CONFIG_KEY_NAMES) <= set(keys)
    conf = os.path.join(home, "pipe2me.server.conf")
    out = done.stdout
    assert re.search(r"^TUNNEL_DOMAIN=example\.test  # %s:2$" % re.escape(conf), out, re.M), out
    assert re.search(r"^HTTPS_PORT=9443  # environment HTTPS_PORT$", out, re.M), out
    assert re.search(r"^HTTP_PORT=9080  # flag --http-port$", out, re.M), out
    assert re.search(r"^STATE_DIR=%s  # default$" % re.escape(os.path.join(home, ".pipe2me-server")),
                     out, re.M), out
    assert "VerySecretApiToken123" not in out
    assert not os.path.exists(os.path.join(home, ".pipe2me-server"))  # check-config writes nothing


# ---- the API's pages ------------------------------------------------------------------------

def test_api_cacert_config_over_curl(first, tmp_path):
    server, pod_dir, _ = first
    status, ctype, body = curl_get(server.url + "/cacert")
    assert status == 200 and ctype.startswith("text/plain")
    with open(os.path.join(pod_dir, "pipe2me.cacert"), "rb") as fh:
        assert body == fh.read()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(body)
    fields = cert_fields(str(ca_file))
    assert fields["Basic Constraints"] == "CA:TRUE"
    status, ctype, body = curl_get(server.url + "/config")
    assert status == 200 and ctype == "application/json"
    assert json.loads(body) == {
        "protocol_version": 1, "tunnel_domain": DOMAIN, "tunnel_port": server.tunnel,
        "http_port": server.http, "https_port": server.https,
        "protocols": ["http", "https", "imap", "imaps", "smtp", "smtps", "ssh", "tcp"]}
    status, _, body = curl_get(server.url + "/config?format=shell")
    assert status == 200
    script = body.decode() + 'echo "$protocol_version $tunnel_domain $protocols_0 $protocols_7"'
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert out.stdout == "1 %s http tcp\n" % DOMAIN, (body, out.stderr)


def test_api_over_https_verifies_with_the_pinned_ca(first):
    server, pod_dir, _ = first
    cacert = os.path.join(pod_dir, "pipe2me.cacert")
    for url, extra in (("https://127.0.0.1:%d/config" % server.https, []),
                       ("https://%s:%d/config" % (DOMAIN, server.https),
                        ["--resolve", "%s:%d:127.0.0.1" % (DOMAIN, server.https)])):
        status, _, body = curl_get(url, "--cacert", cacert, *extra)
        assert status == 200 and json.loads(body)["tunnel_domain"] == DOMAIN


def test_api_metrics_is_prometheus_text(first):
    server = first[0]
    status, ctype, body = curl_get(server.url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    text = body.decode()
    families, samples = set(), {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(" ", 3)
            families.add(parts[2])
            if parts[1] == "TYPE":
                assert parts[3] in ("gauge", "counter", "histogram", "summary", "untyped")
            continue
        match = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})?'
                             r' (-?[0-9.]+(e[+-]?[0-9]+)?)', line)
        assert match, line
        assert match.group(1) in families or match.group(1).rsplit("_", 1)[0] in families, line
        samples[match.group(1) + (match.group(2) or "")] = float(match.group(4))
    online = sum(1 for r in server.records().values() if r["expires_at"] > time.time())
    assert samples['pipe2me_tunnels{status="online"}'] == online >= 1


def test_api_status_page_and_unknown_paths(first):
    server = first[0]
    status, ctype, body = curl_get(server.url + "/")
    assert status == 200 and ctype.startswith("text/")
    text = body.decode()
    assert "pipe2me" in text and DOMAIN in text
    assert "tunnels: %d" % len(server.records()) in text
    status, ctype, body = curl_get(server.url + "/no/such/page")
    assert status == 404 and ctype == "application/json"
    assert_json_error(status, json.loads(body))
    status, body = request_json(server.url + "/config", "DELETE")
    assert status == 405
    assert_json_error(status, body)
    status, body = request_json(server.url + "/tunnels/%s/verify" % ("0" * 16))
    assert status == 404 and body["status"] == "unknown", body


# ---- the documented example configuration --------------------------------------------------------

def test_config_example_documents_every_key_and_is_accepted(server_mod, workdir):
    """Every configuration key appears in pipe2me.server.conf.example with a
    comment above it, and the server accepts the file as it is."""
    path = os.path.join(os.path.dirname(SERVER), "pipe2me.server.conf.example")
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    keys = {}
    for number, line in enumerate(lines):
        match = re.match(r"^([A-Z_]+)=", line)
        if match:
            keys[match.group(1)] = number
            assert lines[number - 1].startswith("#"), "%s has no comment" % match.group(1)
    assert set(keys) == set(server_mod.CONFIG_KEYS)
    env = clean_env(os.path.join(workdir, "home"))
    done = run_server(["--config", path, "--state-dir", os.path.join(workdir, "state"),
                       "check-config"], env)
    assert done.returncode == 0, done.stderr
    for key in server_mod.CONFIG_KEYS:
        assert re.search(r"^%s=" % key, done.stdout, re.M), key


def test_admin_tokens_add_without_name_generates_one(workdir):
    env = clean_env(os.path.join(workdir, "home"))
    state = os.path.join(workdir, "state")
    done = run_server(["--state-dir", state, "tokens", "add", "max_ports:3", "lifespan:1h"], env)
    assert done.returncode == 0, done.stderr
    name = done.stdout.strip()
    assert name.startswith("p2m-") and len(name) > 20
    with open(os.path.join(state, "tokens.conf")) as fh:
        line = [l for l in fh.read().splitlines() if l.startswith(name)][0]
    assert "max_ports:3" in line and "lifespan:3600" in line
