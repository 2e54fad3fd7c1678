"""Certificate rules against a real server, real pods and the real openssl, written as a
tenant with a valid tunnel secret would attack them: signing as fast as it can, keeping
the files it got signed, and connecting with a certificate its pod has replaced."""

import concurrent.futures
import http.client
import json
import os
import re
import shutil

from conftest import ServerHandle, echo_round_trip, free_port, public_ports, run_pod, \
    setup_pod, start_pod, wait_until
from helpers import api, make_csr, make_key, openssl

PER_HOUR = 6    # the default MAX_CERTS_PER_HOUR


# ---- helpers ------------------------------------------------------------------

def setup(server, pod_dir):
    """A pod with one tcp service on a free local port (served by `start --echo`)."""
    return setup_pod(server, pod_dir, "tcp", [free_port()])


def new_key(path):
    os.chmod(make_key(path), 0o600)
    return path


def csr_for(key, fqdn, *addext):
    return make_csr(key, "/CN=" + fqdn, *addext)


def info(pod_dir):
    """id, fqdn and secret from the pod's pipe2me.info.inc (single-quoted shell values)."""
    with open(os.path.join(pod_dir, "pipe2me.info.inc")) as fh:
        values = dict(re.findall(r"^(PIPE2ME_\w+)='([^']*)'", fh.read(), re.M))
    return values["PIPE2ME_ID"], values["PIPE2ME_FQDN"], values["PIPE2ME_SECRET"]


def api_busy(answer):
    """The API's answer to a source over its share of API workers (not the signing limit)."""
    return answer.status == 429 and b"too many API requests at once" in answer.body


def post_csr(server, pod_dir, csr):
    """POST /tunnels/<id>/cert with the pod's secret: (status, JSON body, Retry-After).
    While the API turns this source away (busy: its share of API workers is
    still taken by a flood's connections), wait for a worker, up to 30 s."""
    tunnel_id, _fqdn, secret = info(pod_dir)

    def answered():
        answer = api(server, "POST", "/tunnels/%s/cert" % tunnel_id, {"csr": csr},
                     secret=secret, timeout=60)
        return None if api_busy(answer) else answer
    answer = wait_until(answered, timeout=30, interval=0.2, what="an API worker")
    return answer.status, answer.json(), answer.headers.get("Retry-After")


def flood_csr(server, pod_dir, csr):
    """post_csr without waiting: (None, None, None) when the server closed the connection
    unanswered or was busy (its per-source share of API connections)."""
    try:
        answer = api(server, "POST", "/tunnels/%s/cert" % info(pod_dir)[0], {"csr": csr},
                     secret=info(pod_dir)[2], timeout=60)
    except (ConnectionError, http.client.HTTPException):
        return None, None, None
    if api_busy(answer):
        return None, None, None
    return answer.status, answer.json(), answer.headers.get("Retry-After")


def record(server, pod_dir):
    with open(os.path.join(server.state_dir, "tunnels", info(pod_dir)[0] + ".json")) as fh:
        return json.load(fh)


def issued(server):
    return sorted(name[:-4] for name in os.listdir(os.path.join(server.state_dir, "ca", "issued")))


def listed_serials(server):
    folder = os.path.join(server.state_dir, "tunnels")
    serials = []
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as fh:
            serials += json.load(fh).get("cert_serials", [])
    return sorted(serials)


def install(pod_dir, key, cert_pem):
    """Put a new key and certificate in the pod's files, as `update` would."""
    shutil.copy(key, os.path.join(pod_dir, "pipe2me.openssl.priv"))
    with open(os.path.join(pod_dir, "pipe2me.openssl.cert"), "w") as fh:
        fh.write(cert_pem)


def copy_pod(pod_dir, to):
    """What a thief of the pod's directory holds: key, certificate, secret, pinned CA."""
    shutil.copytree(pod_dir, to)
    return to


def refused_start(workdir, pod_dir, name):
    """Start a pod that must be refused for good: it exits non-zero, naming the reason."""
    proc = start_pod(workdir, pod_dir, name=name, wait=False)
    try:
        proc.popen.wait(60)
    finally:
        proc.stop()
    assert proc.popen.returncode not in (0, None), proc.stderr()
    assert "replaced by a newer one" in proc.stderr(), proc.stderr()[-2000:]
    return proc


def signs(server):
    return len(re.findall(r"certificate signed tunnel=", server.proc.stderr()))


# ---- signing rate --------------------------------------------------------------

def bad_signature(csr):
    """The CSR with its signature's last byte changed (the DER stays well formed)."""
    der = bytearray(openssl("req", "-outform", "DER", input_bytes=csr.encode()))
    der[-1] ^= 1
    return openssl("req", "-inform", "DER", input_bytes=bytes(der)).decode()


def test_cert_rules_signing_flood_gets_json_429_with_retry_after(workdir):
    server = ServerHandle(workdir)
    try:
        pod_dir = os.path.join(workdir, "pod")
        fqdn = setup(server, pod_dir)        # setup signed one certificate
        key = new_key(os.path.join(workdir, "flood.key"))
        csrs = [csr_for(key, fqdn, "subjectAltName=DNS:evil%d.example" % i) for i in range(4)]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: flood_csr(server, pod_dir, csrs[i % 4]), range(60)))
        # the API's per-source share may cut some connections (None), signed or not
        later = [post_csr(server, pod_dir, csrs[0]) for _ in range(PER_HOUR)]
        assert [status for status, _, _ in later] == [429] * PER_HOUR
        answers += later
        statuses = [status for status, _, _ in answers]
        assert statuses.count(200) <= PER_HOUR - 1 and set(statuses) <= {200, 429, None}
        for status, body, retry_after in answers:
            if status == 429:
                assert "MAX_CERTS_PER_HOUR" in body["error"] and "\n" not in body["error"]
                assert retry_after is not None and 0 < int(retry_after) <= 3600 // PER_HOUR + 1
                assert body["retry_after_s"] == int(retry_after)
        assert signs(server) == PER_HOUR, statuses      # setup's, then 5 of the flood
        # once spent, even a CSR that would be refused costs no openssl run: 429 first
        assert post_csr(server, pod_dir, bad_signature(csrs[0]))[0] == 429
        # the pod's own renewal says so in one line and exits 3 (unavailable: retry later)
        os.unlink(os.path.join(pod_dir, "pipe2me.openssl.cert"))
        renewal = run_pod(pod_dir, "update")
        assert renewal.returncode == 3, renewal.stderr
        lines = renewal.stderr.strip().splitlines()
        assert len(lines) == 1 and "MAX_CERTS_PER_HOUR" in lines[0] and "Traceback" not in lines[0]
        # whatever got through left at most CERT_KEEP (3) files behind
        assert issued(server) == listed_serials(server)
        assert len(record(server, pod_dir)["cert_serials"]) <= 3
        # the limit is per tunnel and counts certificates: refused CSRs cost nothing
        other = os.path.join(workdir, "other")
        other_fqdn = setup(server, other)
        before = issued(server), record(server, other)
        for _ in range(10):
            status, body, _ = post_csr(server, other, bad_signature(csr_for(key, other_fqdn)))
            assert status == 400 and "signature" in body["error"], body
        assert (issued(server), record(server, other)) == before      # no state change
        statuses = [post_csr(server, other, csr_for(key, other_fqdn))[0] for _ in range(PER_HOUR)]
        assert statuses == [200] * (PER_HOUR - 1) + [429], statuses
    finally:
        assert server.stop() == 0


def test_cert_rules_issued_keeps_current_and_recent_only(workdir):
    server = ServerHandle(workdir, extra=["--max-certs-per-hour", "0"])   # no rate limit here
    try:
        pod_dir = os.path.join(workdir, "pod")
        fqdn = setup(server, pod_dir)
        key = new_key(os.path.join(workdir, "next.key"))
        for _ in range(12):
            status, body, _ = post_csr(server, pod_dir, csr_for(key, fqdn))
            assert status == 200, body
            assert issued(server) == listed_serials(server)
        kept = record(server, pod_dir)
        assert len(kept["cert_serials"]) == len(kept["cert_sha256"]) == 3
        assert signs(server) == 13
        # the first (setup's, never used) stays as the fallback, then the two newest
        first = kept["cert_serials"][0]
        assert body["cert"] == open(os.path.join(server.state_dir, "ca", "issued",
                                                 kept["cert_serials"][-1] + ".pem")).read()
        install(pod_dir, key, body["cert"])
        pod = start_pod(workdir, pod_dir, "--echo")
        try:
            assert record(server, pod_dir)["cert_serials"] == kept["cert_serials"][-1:]
            assert first not in issued(server)
            assert issued(server) == listed_serials(server)
            assert echo_round_trip(public_ports(pod_dir)[0]) == b"ping through pipe2me\n"
        finally:
            pod.stop()
        # a deleted tunnel's files leave issued/ (at the latest when the server starts again)
        assert run_pod(pod_dir, "clear", "--yes").returncode == 0
        server.restart()
        assert issued(server) == listed_serials(server) == []
    finally:
        assert server.stop() == 0


# ---- a replaced certificate -------------------------------------------------------

def test_cert_rules_old_key_cannot_take_over_once_the_new_one_connected(workdir):
    server = ServerHandle(workdir)
    try:
        pod_dir = os.path.join(workdir, "pod")
        fqdn = setup(server, pod_dir)
        pod = start_pod(workdir, pod_dir, "--echo", name="pod-old-cert")
        port = public_ports(pod_dir)[0]
        thief = copy_pod(pod_dir, os.path.join(workdir, "thief"))
        # the owner renews with a new key; until the new certificate is used, the old one
        # still connects (a pod that crashed before writing its new certificate)
        key = new_key(os.path.join(workdir, "new.key"))
        status, body, _ = post_csr(server, pod_dir, csr_for(key, fqdn))
        assert status == 200, body
        pod.stop()
        pod = start_pod(workdir, pod_dir, "--echo", name="pod-crashed-before-writing")
        assert echo_round_trip(port) == b"ping through pipe2me\n"
        pod.stop()
        install(pod_dir, key, body["cert"])
        pod = start_pod(workdir, pod_dir, "--echo", name="pod-new-cert")
        try:
            seen = len(server.proc.stderr())
            for attempt in range(3):      # the stolen files, again and again: never in
                refused_start(workdir, thief, "thief-%d" % attempt)
            assert "pod connected" not in server.proc.stderr()[seen:]
            assert pod.alive() and pod.stderr().count("tunnel up") == 1, pod.stderr()
            assert echo_round_trip(port) == b"ping through pipe2me\n"
            server.restart()              # nor after the server restarted
            refused_start(workdir, thief, "thief-after-restart")
        finally:
            pod.stop()
        listed = record(server, pod_dir)["cert_sha256"]
        assert len(listed) == 1
    finally:
        assert server.stop() == 0


def test_cert_rules_renewals_never_used_keep_the_used_certificate(workdir):
    """Two renewals in a row, neither written by the pod (it crashed each time): the
    certificate it still has connects; using the newest retires both older ones."""
    server = ServerHandle(workdir)
    try:
        pod_dir = os.path.join(workdir, "pod")
        fqdn = setup(server, pod_dir)
        start_pod(workdir, pod_dir, name="pod-first").stop()
        original = copy_pod(pod_dir, os.path.join(workdir, "original"))
        keys = [new_key(os.path.join(workdir, "k%d.key" % i)) for i in range(3)]
        certs = []
        for key in keys:
            status, body, _ = post_csr(server, pod_dir, csr_for(key, fqdn))
            assert status == 200, body
            certs.append(body["cert"])
        start_pod(workdir, original, name="pod-still-original").stop()
        middle = copy_pod(pod_dir, os.path.join(workdir, "middle"))
        install(middle, keys[1], certs[1])
        install(pod_dir, keys[2], certs[2])
        start_pod(workdir, pod_dir, name="pod-newest").stop()
        refused_start(workdir, original, "original-after")
        refused_start(workdir, middle, "middle-after")
        assert issued(server) == listed_serials(server)
        assert len(listed_serials(server)) == 1
    finally:
        assert server.stop() == 0
