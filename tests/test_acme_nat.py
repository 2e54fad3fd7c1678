"""ACME for a direct tunnel, behind the real NAT of tests/nat_testbed.py: the
pod's name points at its router, not at the server, and DNS-01 through the
built-in DNS still gets it a publicly trusted certificate, which an outside
consumer verifies on the direct path. Pebble runs in "wan" next to the
server and resolves through the server's DNS on port 53. Needs root."""

import os
import subprocess
import sys

import pytest

import nat_testbed
from conftest import wait_until
from test_acme import acme_installed
from test_nat import DOMAIN, Home, SERVICE_MAX_S, shell_values

pytestmark = [pytest.mark.slow, pytest.mark.netns]

PEBBLE_PORT, PEBBLE_MANAGEMENT_PORT = 14000, 15000

VERIFY_SCRIPT = r"""
import socket, ssl, sys
host, port, name, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
context = ssl.create_default_context(cafile=cafile)
with socket.create_connection((host, port), timeout=10) as raw:
    with context.wrap_socket(raw, server_hostname=name) as tls:
        print(tls.recv(200).decode(), end="")
"""


class AcmeHome(Home):
    """Home (see test_nat) whose server orders certificates from pebble in "wan"."""

    def __init__(self, nat, workdir):
        self.pebble_dir = os.path.join(workdir, "pebble")
        os.makedirs(self.pebble_dir)
        self.pebble_cert = os.path.join(self.pebble_dir, "cert.pem")
        key = os.path.join(self.pebble_dir, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-keyout", key, "-out", self.pebble_cert, "-days", "2", "-subj",
                        "/CN=pebble test", "-addext", "subjectAltName=IP:" + nat.wan_ip],
                       check=True, capture_output=True)
        self.pebble_config = os.path.join(self.pebble_dir, "config.json")
        with open(self.pebble_config, "w") as fh:
            fh.write('{"pebble": {"listenAddress": "%s:%d", "managementListenAddress": "%s:%d", '
                     '"certificate": "%s", "privateKey": "%s", "httpPort": 5002, "tlsPort": 5001, '
                     '"ocspResponderURL": "", "externalAccountBindingRequired": false}}'
                     % (nat.wan_ip, PEBBLE_PORT, nat.wan_ip, PEBBLE_MANAGEMENT_PORT,
                        self.pebble_cert, key))
        super().__init__(nat, workdir)

    def server_flags(self):
        return super().server_flags() + [
            "--acme-directory", "https://%s:%d/dir" % (self.nat.wan_ip, PEBBLE_PORT),
            "--acme-ca-bundle", self.pebble_cert, "--acme-retry", "1"]

    def start_pebble(self):
        out = open(os.path.join(self.workdir, "pebble.out"), "wb")
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1")
        env.pop("PEBBLE_WFE_NONCEREJECT", None)
        self.nat.run_in("wan", ["pebble", "-config", self.pebble_config, "-dnsserver",
                                "%s:53" % self.nat.wan_ip], stdout=out, stderr=out, env=env)
        wait_until(lambda: b"ACME directory available" in
                   open(os.path.join(self.workdir, "pebble.out"), "rb").read(),
                   timeout=20, what="pebble in wan")

    def pebble_root(self):
        done = self.nat.call_in("wan", ["curl", "-sS", "--cacert", self.pebble_cert, "https://%s:%d/roots/0"
                                        % (self.nat.wan_ip, PEBBLE_MANAGEMENT_PORT)])
        path = os.path.join(self.workdir, "pebble-root.pem")
        with open(path, "w") as fh:
            fh.write(done.stdout)
        return path


@pytest.fixture
def home(tmp_path):
    with nat_testbed.NatTestbed(natpmp=True) as nat:
        place = AcmeHome(nat, str(tmp_path))
        try:
            yield place
        finally:
            place.close()


def test_acme_nat_direct_tunnel_gets_its_certificate_through_dns01(home):
    nat = home.nat
    home.fqdn = home.pod_cmd("setup", "--server", home.url, "--auth", home.token,
                             "--protocols", "https").stdout.strip()
    port = int(shell_values(home.pod_cmd("env").stdout)["PIPE2ME_URLS_0"].rsplit(":", 1)[1])
    home.https_port, home.tcp_port = port, port
    key = os.path.join(home.pod_dir, "pipe2me.openssl.priv")
    cert = os.path.join(home.pod_dir, "pipe2me.openssl.cert")
    _port, first = nat.start_banner_server("lan", "tls-service", port=port, max_s=SERVICE_MAX_S,
                                           tls=(cert, key))  # with the server-CA certificate
    home.pod_cmd("map-ports")
    assert home.check()["STATUS"] == "online"          # direct: the name points at the router
    assert home.dig("wan") == [nat.router_wan_ip]
    home.start_pebble()                                 # only now can the CA validate
    home.start_pod()
    wait_until(lambda: acme_installed(home.pod_dir), timeout=90, what="pebble's certificate")
    assert home.reach()["status"] == "direct"
    first.terminate()                                   # the service starts again with the new chain
    first.wait(10)
    nat.start_banner_server("lan", "tls-service", port=port, max_s=SERVICE_MAX_S, tls=(cert, key))
    done = nat.call_in("wan", [sys.executable, "-c", VERIFY_SCRIPT, nat.router_wan_ip, str(port),
                               home.fqdn, home.pebble_root()])
    assert done.returncode == 0, done.stderr
    assert done.stdout == "tls-service %s\n" % nat.wan_ip  # straight to the pod, verified
