"""The shortest path, proven behind a real NAT (issue 6, acceptance 3 and 4).

tests/nat_testbed.py builds three network namespaces: "wan" (the server at
its wan address, with PUBLIC_ADDRESS, the built-in DNS on port 53, and an
outside consumer), "router" (nftables masquerade, Debian's miniupnpd with
NAT-PMP and UPnP IGD) and "lan" (the pod, its services on local ports equal
to the public ones, and a LAN consumer). The services answer
"<name> <peer address>", so a consumer can tell whether it reached the
service straight (it sees the consumer's address) or through the relay (it
sees 127.0.0.1, where the pod connects).

One sequence per mapping method (NAT-PMP; UPnP IGD on a router without
NAT-PMP): set up and start, check (relayed), map-ports, check (direct), DNS
and consumers, split horizon, mapping removed at the router, dns-refresh
falls back; then a clean stop and `clear` remove the mappings. Needs root.
"""

import glob
import json
import os
import re
import signal
import sys
import time

import pytest

import nat_testbed
from conftest import POD, SERVER, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.netns]

DOMAIN = "pipe2.test"
FIRST_PORT = 20000
SERVICE_MAX_S = 300


def find_python38():
    for path in sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8"))
                       + ["/usr/bin/python3.8"]):
        if os.access(path, os.X_OK):
            return path
    return None


POD_PYTHON = find_python38() or sys.executable  # the pod must run on Python 3.8


FETCH = r"""
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
print(opener.open(sys.argv[1], timeout=10).read().decode(), end="")
"""


class NsProc:
    """A long-running process inside a namespace, output in files."""

    def __init__(self, nat, role, argv, workdir, name, env=None):
        self.name = name
        self.out_path = os.path.join(workdir, name + ".out")
        self.err_path = os.path.join(workdir, name + ".err")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = nat.run_in(role, argv, stdout=out, stderr=err, env=env)

    def stdout(self):
        return open(self.out_path, encoding="utf-8", errors="replace").read()

    def stderr(self):
        return open(self.err_path, encoding="utf-8", errors="replace").read()

    def wait_for(self, pattern, timeout=20.0, after=0):
        def found():
            if self.popen.poll() is not None and not re.search(pattern, self.stderr()[after:]):
                raise AssertionError("%s exited %s before %r:\n%s" % (
                    self.name, self.popen.returncode, pattern, self.stderr()[-3000:]))
            return re.search(pattern, self.stderr()[after:])
        return wait_until(found, timeout, what="%r from %s" % (pattern, self.name))

    def stop(self):
        """SIGTERM by PID; the exit code (after at most 30 s)."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
        return self.popen.wait(30)


def shell_values(text):
    """KEY=value lines (values maybe single-quoted) as a dict."""
    return {key: value.strip("'") for key, _, value in
            (line.partition("=") for line in text.splitlines() if "=" in line)}


class Home:
    """The server in "wan", the pod and its services in "lan"; see the module doc."""

    def __init__(self, nat, workdir):
        self.nat, self.workdir = nat, workdir
        self.state_dir = os.path.join(workdir, "state")
        self.pod_dir = os.path.join(workdir, "pod")
        self.env = dict(os.environ, HOME=workdir)
        self.server = NsProc(nat, "wan", [sys.executable, SERVER] + self.server_flags(),
                             workdir, "server", env=self.env)
        self.server.wait_for(r"ready http=.* dns=%s:53" % re.escape(nat.wan_ip))
        self.token = wait_until(lambda: re.search(r"^token: (\S+)", self.server.stdout(), re.M),
                                10, what="the first token").group(1)
        self.url = "http://%s:8080" % nat.wan_ip
        self.pod = None

    def server_flags(self):
        wan = self.nat.wan_ip
        return ["--state-dir", self.state_dir, "--listen-address", wan, "--public-address", wan,
                "--tunnel-domain", DOMAIN, "--tunnel-ports", "%d...%d" % (FIRST_PORT, FIRST_PORT + 10),
                "--dynamic-dns-service", "builtin", "--dns-port", "53", "--heartbeat-interval", "1",
                "--metrics-allow", wan]  # /metrics names tenants only to allowed clients

    def pod_cmd(self, *args, check=True):
        done = self.nat.call_in("lan", [POD_PYTHON, POD, "--dir", self.pod_dir] + list(args),
                                timeout_s=90)
        assert not check or done.returncode == 0, "%s: %s" % (args, done.stderr)
        return done

    def setup(self):
        self.fqdn = self.pod_cmd("setup", "--server", self.url, "--auth", self.token,
                                 "--protocols", "tcp,https").stdout.strip()
        env = shell_values(self.pod_cmd("env").stdout)
        self.tcp_port = int(env["PIPE2ME_URLS_0"].rsplit(":", 1)[1])
        self.https_port = int(env["PIPE2ME_URLS_1"].rsplit(":", 1)[1])
        self.nat.start_banner_server("lan", "tcp-service", port=self.tcp_port, max_s=SERVICE_MAX_S)
        self.nat.start_banner_server(  # TLS with the pod's own certificate
            "lan", "tls-service", port=self.https_port, max_s=SERVICE_MAX_S,
            tls=(os.path.join(self.pod_dir, "pipe2me.openssl.cert"),
                 os.path.join(self.pod_dir, "pipe2me.openssl.priv")))

    def start_pod(self, name="pod"):
        self.pod = NsProc(self.nat, "lan", [POD_PYTHON, POD, "--dir", self.pod_dir, "start"],
                          self.workdir, name)
        self.pod.wait_for(r"tunnel up")
        return self.pod

    def check(self):
        return shell_values(self.pod_cmd("check").stdout)

    def dig(self, role):
        done = self.nat.call_in(role, ["dig", "@" + self.nat.wan_ip, "+short", "+time=2",
                                       "+tries=2", self.fqdn, "A"])
        return done.stdout.split()

    def dns_refresh(self):
        done = self.nat.call_in("wan", [sys.executable, SERVER] + self.server_flags()
                                + ["dns-refresh"], timeout_s=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def tunnel_bytes(self):
        text = self.nat.call_in("wan", [sys.executable, "-c", FETCH, self.url + "/metrics"]).stdout
        found = re.findall(r'pipe2me_tunnel_bytes_total\{fqdn="%s",direction="\w+"\} (\d+)'
                           % re.escape(self.fqdn), text)
        assert len(found) == 2, text
        return sum(int(n) for n in found)

    def through_relay(self):
        """An outside consumer at the server's address gets the service through the relay."""
        ok, data = self.nat.probe_tcp("wan", self.nat.wan_ip, self.tcp_port)
        assert ok and data == "tcp-service 127.0.0.1\n", data

    def reach(self):
        (name,) = [n for n in os.listdir(os.path.join(self.state_dir, "tunnels"))
                   if n.endswith(".json")]
        return json.load(open(os.path.join(self.state_dir, "tunnels", name))).get("reach")

    def forwarded(self):
        return set(self.nat.router_forwarded_ports()) & {self.tcp_port, self.https_port}

    def close(self):
        """Stop the pod (if started) and the server, which must exit 0 with no traceback."""
        if self.pod is not None:
            self.pod.stop()
        assert self.server.stop() == 0
        assert "Traceback" not in self.server.stderr(), self.server.stderr()[-3000:]


@pytest.fixture(params=["natpmp", "upnp"])
def home(request, tmp_path):
    """natpmp: a router with NAT-PMP and UPnP, `map-ports` picks NAT-PMP.
    upnp: a router without NAT-PMP, `map-ports --method upnp`."""
    with nat_testbed.NatTestbed(natpmp=request.param == "natpmp") as nat:
        place = Home(nat, str(tmp_path))
        place.method = request.param
        try:
            yield place
        finally:
            place.close()


def test_nat_shortest_path_sequence(home):
    nat = home.nat
    # a. behind the NAT the pod sets up and starts; the outside consumer gets through the server
    home.setup()
    home.start_pod()
    home.through_relay()
    # b. before mapping: check says relayed, DNS answers the server
    before = home.check()
    assert before["STATUS"] == "offline" and before["ADDRESS"] == nat.router_wan_ip, before
    assert "CGNAT" not in before and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", before["TIME"])
    assert home.reach()["status"] == "relayed" and "port %d" % home.tcp_port in home.reach()["reason"]
    assert home.dig("wan") == [nat.wan_ip]
    home.through_relay()
    # c. after map-ports: direct, DNS answers the router, the server carries nothing
    args = ["map-ports"] + (["--method", "upnp"] if home.method == "upnp" else [])
    mapped = shell_values(home.pod_cmd(*args).stdout)
    assert mapped["METHOD"] == home.method and mapped["EXTERNAL_ADDRESS"] == nat.router_wan_ip
    assert mapped["PORTS"] == "%d,%d" % (home.tcp_port, home.https_port)
    assert nat.router_forwarded_ports()[home.tcp_port] == "%s:%d" % (nat.lan_ip, home.tcp_port)
    after = home.check()
    assert after["STATUS"] == "online" and after["ADDRESS"] == nat.router_wan_ip, after
    assert home.reach()["ports"] == {str(home.tcp_port): True, str(home.https_port): True}
    assert home.reach()["lan_address"] == nat.lan_ip
    (address,) = home.dig("wan")
    assert address == nat.router_wan_ip
    relayed_before = home.tunnel_bytes()
    home.through_relay()                                  # the counters do move for the relay
    carried = home.tunnel_bytes()
    assert carried > relayed_before
    ok, data = nat.probe_tcp("wan", address, home.tcp_port)
    assert ok and data == "tcp-service %s\n" % nat.wan_ip, data   # straight: it sees the consumer
    tls = nat.call_in("wan", ["openssl", "s_client", "-connect", "%s:%d" % (address, home.https_port),
                              "-servername", home.fqdn, "-verify_return_error", "-quiet", "-CAfile",
                              os.path.join(home.pod_dir, "pipe2me.cacert")], input="")
    assert "tls-service %s\n" % nat.wan_ip in tls.stdout, tls.stderr  # TLS straight to the pod
    assert home.tunnel_bytes() == carried, "the server carried bytes of the direct connection"
    # d. the LAN consumer asking the built-in DNS gets the pod's LAN address and connects there
    assert home.dig("lan") == [nat.lan_ip]
    ok, data = nat.probe_tcp("lan", nat.lan_ip, home.tcp_port)
    assert ok and data == "tcp-service %s\n" % nat.lan_ip, data
    assert home.tunnel_bytes() == carried
    home.through_relay()
    # e. the mapping disappears at the router: the next dns-refresh falls back to the server
    assert home.dns_refresh() == ""                       # still direct: nothing to change
    nat.remove_mapping_at_router(home.tcp_port)
    removed = time.monotonic()
    home.through_relay()
    changed = home.dns_refresh()
    assert changed.startswith("relayed %s (was direct at %s: port %d:"
                              % (home.fqdn, nat.router_wan_ip, home.tcp_port)), changed
    wait_until(lambda: home.dig("wan") == [nat.wan_ip], 10, what="DNS back on the server")
    print("\n%s: removed mapping detected and DNS back on the server in %.2f s"
          % (home.method, time.monotonic() - removed))
    assert home.dig("lan") == [nat.wan_ip]
    home.through_relay()
    assert home.dns_refresh() == ""                       # idempotent


def test_nat_clean_stop_and_clear_remove_the_mappings(home):
    nat = home.nat
    home.setup()
    args = ["map-ports"] + (["--method", "upnp"] if home.method == "upnp" else [])
    home.pod_cmd(*args)
    assert home.forwarded() == {home.tcp_port, home.https_port}
    pod = home.start_pod()
    # start keeps the saved mappings: it maps again at once (and renews at half the lease)
    pod.wait_for(r"port mapping renewed method=%s address=%s" % (home.method, nat.router_wan_ip))
    assert home.check()["STATUS"] == "online"
    home.through_relay()
    assert pod.stop() == 0                               # a clean stop removes them
    home.pod = None
    assert home.forwarded() == set(), nat.router_forwarded_ports()
    assert "Traceback" not in pod.stderr()
    assert os.path.exists(os.path.join(home.pod_dir, "pipe2me.portmap.json"))
    pod = home.start_pod(name="pod2")                    # the next start maps them again
    wait_until(lambda: home.forwarded() == {home.tcp_port, home.https_port}, 15,
               what="mappings back after start")
    assert pod.stop() == 0
    home.pod = None
    home.pod_cmd(*args)
    assert home.forwarded() == {home.tcp_port, home.https_port}
    home.pod_cmd("clear", "--yes")                       # clear removes them too
    assert home.forwarded() == set(), nat.router_forwarded_ports()
    assert not os.path.exists(os.path.join(home.pod_dir, "pipe2me.portmap.json"))
