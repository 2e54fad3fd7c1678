"""A home network behind a real NAT, built from network namespaces, for tests.

Topology (every address private, every namespace made and removed here):

    wan     eth0 10.200.N.1/24        the "internet": server, consumers, STUN
      |
    router  wan0 10.200.N.2/24        nftables masquerade + forward filter,
            lan0 192.168.N.1/24       miniupnpd (NAT-PMP and UPnP IGD)
      |
    lan     eth0 192.168.N.10/24      the pod; default route via the router

Usage, as root (pytest skips when this machine cannot do it):

    with NatTestbed() as nat:
        port, server = nat.start_banner_server("lan", "hello")
        proc = nat.run_in("lan", ["python3", "-c", "..."], stdout=subprocess.PIPE)
        ok, data = nat.probe_tcp("wan", nat.router_wan_ip, 20000)

Every process started through the testbed is tracked by PID and stopped at
teardown (SIGTERM, then SIGKILL after STOP_TIMEOUT_S), before the namespaces
are deleted. Namespace names carry the pid and a random suffix, so parallel
runs do not clash.

Debian 12's miniupnpd (2.3.1, nftables flavour) needs three things that
this module provides: the nftables table and chains it writes into (it does
not create them), a STUN answer that tells it its external address (it
disables forwarding for a private address on its wan interface), and
running in the foreground (-d) since there is no systemd here.

Run as a script, this file is that STUN responder (started inside "wan"):

    python3 nat_testbed.py stun ADDRESS PORT MAX_SECONDS
"""

import os
import random
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

REQUIRED_TOOLS = ("ip", "nft", "miniupnpd")
STUN_MAGIC_COOKIE = 0x2112A442

# Listens on port 0, prints the port, then answers every connection with
# "<banner> <peer address>\n" until its deadline; over TLS when given a
# certificate and key.
BANNER_SERVER_SCRIPT = r"""
import socket, ssl, sys, time
banner, deadline = sys.argv[1].encode(), time.monotonic() + float(sys.argv[2])
context = None
if len(sys.argv) > 5:  # certificate and key: answer over TLS
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[4], sys.argv[5])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[3])))
srv.listen(16)
print(srv.getsockname()[1], flush=True)
while time.monotonic() < deadline:
    srv.settimeout(max(deadline - time.monotonic(), 0.01))
    try:
        conn, peer = srv.accept()
    except socket.timeout:
        break
    conn.settimeout(5)
    try:
        with context.wrap_socket(conn, server_side=True) if context else conn as out:
            out.sendall(banner + b" " + peer[0].encode() + b"\n")
    except OSError:
        conn.close()
"""

# Connects, reads until EOF (or timeout, at most 64 KiB), prints "OK <data>"
# or "ERR <reason>" and exits 0 or 1.
PROBE_SCRIPT = r"""
import socket, sys
timeout = float(sys.argv[3])
try:
    conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=timeout)
except OSError as e:
    print("ERR", type(e).__name__, e)
    sys.exit(1)
data = b""
with conn:
    conn.settimeout(timeout)
    while len(data) < 65536:
        try:
            chunk = conn.recv(4096)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
print("OK", data.decode("utf-8", "replace"), end="")
"""


class NatTestbedError(Exception):
    """The testbed could not be built or a router operation failed."""


def skip_reason():
    """Return why a NatTestbed cannot run on this machine, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "NAT testbed needs root (network namespaces, nftables)"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return ("NAT testbed needs %s (apt-get install iproute2 nftables miniupnpd)"
                % ", ".join(missing))
    return None


def _read_line(proc, timeout_s):
    """Return the next stdout line of `proc` (text), or None at the deadline/EOF."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            return None
    line = proc.stdout.readline()
    return line or None


class NatTestbed:
    """Three namespaces (wan, router, lan) with NAT and miniupnpd; see module doc.

    Attributes: `ns` maps role -> namespace name; `wan_ip`, `router_wan_ip`,
    `router_lan_ip`, `lan_ip`, `lan_subnet`; `upnp_location` (the IGD
    description URL, None when UPnP is off); `timings` holds `bring_up_s`
    and `teardown_s`; `exit_codes` maps argv[0] of each stopped process to
    its exit status. Settings below are class attributes.
    """

    READY_TIMEOUT_S = 15.0
    STOP_TIMEOUT_S = 5.0
    POLL_INTERVAL_S = 0.02
    STUN_PORT = 3478
    HELPER_MAX_S = 600          # every helper process stops by itself after this

    def __init__(self, natpmp=True, upnp=True, workdir=None):
        tag = "%d-%06x" % (os.getpid(), random.getrandbits(24))
        self.ns = {role: "p2m-%s-%s" % (role, tag) for role in ("wan", "router", "lan")}
        net = random.randint(1, 254)
        self.wan_ip = "10.200.%d.1" % net
        self.router_wan_ip = "10.200.%d.2" % net
        self.router_lan_ip = "192.168.%d.1" % net
        self.lan_ip = "192.168.%d.10" % net
        self.lan_subnet = "192.168.%d.0/24" % net
        self.natpmp, self.upnp = natpmp, upnp
        self._own_workdir = workdir is None
        self.workdir = workdir          # a fresh temporary directory at start() when None
        self.upnp_location = None
        self.timings = {}
        self.exit_codes = {}
        self._procs = []
        self._made_ns = []

    # ---- context manager ---------------------------------------------------

    def __enter__(self):
        reason = skip_reason()
        if reason:
            import pytest
            pytest.skip(reason)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    # ---- bring-up ----------------------------------------------------------

    def start(self):
        """Build namespaces, links, NAT, STUN and miniupnpd; wait until ready."""
        started = time.monotonic()
        if self.workdir is None:
            self.workdir = tempfile.mkdtemp(prefix="pipe2me-nat-")
        self._build_namespaces()
        self._build_links()
        self._sh("router", ["nft", "-f", self._write("router.nft", self._nft_ruleset())])
        self._start_stun()
        self._start_miniupnpd()
        self.timings["bring_up_s"] = time.monotonic() - started

    def _sh(self, role, argv, timeout_s=10.0):
        """Run a setup command in `role` (None: the host); raise NatTestbedError on failure."""
        if role is not None:
            argv = ["ip", "netns", "exec", self.ns[role]] + list(argv)
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise NatTestbedError("timed out after %.0f s: %s" % (timeout_s, " ".join(argv))) from None
        if done.returncode != 0:
            raise NatTestbedError("%s failed (%d): %s" % (" ".join(argv), done.returncode,
                                                       done.stdout.decode(errors="replace").strip()))
        return done.stdout.decode(errors="replace")

    def _write(self, name, text):
        path = os.path.join(self.workdir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def _build_namespaces(self):
        for role in ("wan", "router", "lan"):
            self._sh(None, ["ip", "netns", "add", self.ns[role]])
            self._made_ns.append(self.ns[role])
            # No IPv6 noise (router solicitations, DAD) on links made below.
            self._sh(role, ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                            "net.ipv6.conf.default.disable_ipv6=1"])
            self._sh(None, ["ip", "-n", self.ns[role], "link", "set", "lo", "up"])
        self._sh("router", ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])

    def _build_links(self):
        ns = self.ns
        for router_if, role in (("wan0", "wan"), ("lan0", "lan")):
            # Created directly inside the namespaces: no name clash in the host.
            self._sh(None, ["ip", "link", "add", router_if, "netns", ns["router"], "type", "veth",
                            "peer", "name", "eth0", "netns", ns[role]])
        for role, ifname, address in (("wan", "eth0", self.wan_ip),
                                      ("router", "wan0", self.router_wan_ip),
                                      ("router", "lan0", self.router_lan_ip),
                                      ("lan", "eth0", self.lan_ip)):
            self._sh(None, ["ip", "-n", ns[role], "addr", "add", address + "/24", "dev", ifname])
            self._sh(None, ["ip", "-n", ns[role], "link", "set", ifname, "up"])
        self._sh(None, ["ip", "-n", ns["lan"], "route", "add", "default", "via", self.router_lan_ip])
        # The router's uplink; "wan" itself has no route back into the lan.
        self._sh(None, ["ip", "-n", ns["router"], "route", "add", "default", "via", self.wan_ip])

    def _nft_ruleset(self):
        """The router's firewall: forward lan->wan and what miniupnpd opens."""
        return """\
table inet filter {
    chain forward {
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "wan0" accept
        jump miniupnpd
    }
    chain miniupnpd {
    }
    chain prerouting {
        type nat hook prerouting priority -100; policy accept;
        jump prerouting_miniupnpd
    }
    chain prerouting_miniupnpd {
    }
    chain postrouting {
        type nat hook postrouting priority 100; policy accept;
        jump postrouting_miniupnpd
        oifname "wan0" masquerade
    }
    chain postrouting_miniupnpd {
    }
}
"""

    def _start_stun(self):
        proc = self.run_in("wan", [sys.executable, os.path.abspath(__file__), "stun", self.wan_ip,
                                   str(self.STUN_PORT), str(self.HELPER_MAX_S)],
                           stdout=subprocess.PIPE, universal_newlines=True)
        line = _read_line(proc, self.READY_TIMEOUT_S)
        if not line or not line.startswith("stun ready"):
            raise NatTestbedError("STUN responder did not start: %r" % (line,))

    def _miniupnpd_conf(self):
        return "\n".join([
            "ext_ifname=wan0",
            "listening_ip=lan0",
            "http_port=0",
            "enable_natpmp=%s" % ("yes" if self.natpmp else "no"),
            "enable_upnp=%s" % ("yes" if self.upnp else "no"),
            "secure_mode=yes",
            "ipv6_disable=yes",
            "system_uptime=no",
            "ext_perform_stun=yes",
            "ext_stun_host=%s" % self.wan_ip,
            "ext_stun_port=%d" % self.STUN_PORT,
            "uuid=3c6a8f1e-2b0d-4b8e-9a51-%012x" % random.getrandbits(48),
            "lease_file=%s" % os.path.join(self.workdir, "upnp.leases"),
            "allow 1024-65535 %s 1024-65535" % self.lan_subnet,
            "deny 0-65535 0.0.0.0/0 0-65535",
            "",
        ])

    def _start_miniupnpd(self):
        conf = self._write("miniupnpd.conf", self._miniupnpd_conf())
        pidfile = os.path.join(self.workdir, "miniupnpd.pid")
        with open(os.path.join(self.workdir, "miniupnpd.log"), "wb") as log:
            proc = self.run_in("router", ["miniupnpd", "-f", conf, "-P", pidfile, "-d"],
                               stdout=log, stderr=subprocess.STDOUT)
        wanted = ["Port forwarding is now enabled"]
        wanted += ["Listening for NAT-PMP"] if self.natpmp else []
        wanted += ["HTTP listening on port"] if self.upnp else []
        deadline = time.monotonic() + self.READY_TIMEOUT_S
        while True:
            text = self.miniupnpd_log()
            if all(w in text for w in wanted):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise NatTestbedError("miniupnpd not ready (exit %s), log:\n%s"
                                   % (proc.poll(), text[-3000:]))
            time.sleep(self.POLL_INTERVAL_S)
        match = re.search(r"HTTP listening on port (\d+)", text)
        if match:
            self.upnp_location = "http://%s:%s/rootDesc.xml" % (self.router_lan_ip, match.group(1))

    def miniupnpd_log(self):
        """Return what miniupnpd has logged so far (text)."""
        with open(os.path.join(self.workdir, "miniupnpd.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    # ---- processes -----------------------------------------------------------

    def run_in(self, role, argv, **popen_kwargs):
        """Start `argv` inside namespace `role` ("wan", "router", "lan"); return the Popen.

        `ip netns exec` execs the command, so the PID is the command's own.
        The process is stopped at teardown unless it ended before.
        stdin defaults to /dev/null.
        """
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[role]] + list(argv), **popen_kwargs)
        self._procs.append((proc, os.path.basename(str(argv[0]))))
        return proc

    def call_in(self, role, argv, timeout_s=30.0, input=None):
        """Run `argv` in `role` to completion; return CompletedProcess (text).

        Kills it (by PID) and raises NatTestbedError after `timeout_s`.
        """
        proc = self.run_in(role, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True)
        try:
            out, err = proc.communicate(input, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise NatTestbedError("%s in %s timed out after %.0f s; stderr: %s"
                               % (argv[0], role, timeout_s, err.strip()[-500:])) from None
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def start_banner_server(self, role, banner, port=0, max_s=None, tls=None):
        """Start a TCP server in `role` answering "<banner> <peer ip>\\n", over
        TLS when `tls` is (certificate file, key file).

        Returns (port, Popen); the server stops by itself after `max_s`.
        """
        proc = self.run_in(role, [sys.executable, "-c", BANNER_SERVER_SCRIPT, banner,
                                  str(max_s or self.HELPER_MAX_S), str(port)] + list(tls or ()),
                           stdout=subprocess.PIPE, universal_newlines=True)
        line = _read_line(proc, self.READY_TIMEOUT_S)
        if not line or not line.strip().isdigit():
            raise NatTestbedError("banner server in %s did not start: %r" % (role, line))
        return int(line), proc

    def probe_tcp(self, role, host, port, timeout_s=3.0):
        """Connect from `role` to host:port; return (connected, data_or_reason)."""
        done = self.call_in(role, [sys.executable, "-c", PROBE_SCRIPT, host, str(port),
                                   str(timeout_s)], timeout_s=timeout_s * 3 + 10)
        status, _, rest = done.stdout.partition(" ")
        return status == "OK", rest

    # ---- the router's state --------------------------------------------------

    def router_forwarded_ports(self):
        """Return {external_port: "ip:port"} of the TCP ports the router forwards now.

        Read from miniupnpd's nftables chain, i.e. what the kernel really does.
        """
        text = self._sh("router", ["nft", "list", "chain", "inet", "filter", "prerouting_miniupnpd"])
        return {int(port): target for port, target
                in re.findall(r"dport (\d+) dnat ip to (\S+)", text)}

    def remove_mapping_at_router(self, port):
        """Delete the router's TCP mapping of external `port`, as a router reset would.

        With UPnP on, asks miniupnpd itself (`upnpc -d` from the lan, which
        secure_mode allows since the mapping points at the lan host); else
        deletes its nftables rules. Raises NatTestbedError if it is still there.
        """
        if self.upnp and shutil.which("upnpc"):
            self.call_in("lan", ["upnpc", "-i", "-u", self.upnp_location, "-d", str(port), "TCP"],
                         timeout_s=20)
        else:
            self._delete_nft_rules(port)
        if port in self.router_forwarded_ports():
            raise NatTestbedError("mapping of port %d still present at the router" % port)

    def _delete_nft_rules(self, port):
        """Delete the DNAT rule of external `port` and the filter rule it needs."""
        text = self._sh("router", ["nft", "-a", "list", "chain", "inet", "filter",
                                   "prerouting_miniupnpd"])
        match = re.search(r"dport %d dnat ip to ([\d.]+):(\d+) # handle (\d+)" % port, text)
        if not match:
            return
        address, internal_port, handle = match.groups()
        self._sh("router", ["nft", "delete", "rule", "inet", "filter", "prerouting_miniupnpd",
                            "handle", handle])
        address_hex = "0x%08x" % struct.unpack("!I", socket.inet_aton(address))[0]
        text = self._sh("router", ["nft", "-a", "list", "chain", "inet", "filter", "miniupnpd"])
        for line in text.splitlines():
            match = re.search(r"dport %s .*%s.* # handle (\d+)$" % (internal_port, address_hex), line)
            if match:
                self._sh("router", ["nft", "delete", "rule", "inet", "filter", "miniupnpd",
                                    "handle", match.group(1)])

    # ---- teardown --------------------------------------------------------------

    def stop(self):
        """Stop every tracked process by PID, delete the namespaces; idempotent."""
        started = time.monotonic()
        procs, self._procs = self._procs, []
        for proc, name in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(self.STOP_TIMEOUT_S)
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream:
                    stream.close()
            self.exit_codes.setdefault(name, proc.returncode)
        made, self._made_ns = self._made_ns, []
        for name in made:
            subprocess.run(["ip", "netns", "del", name], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
        if self._own_workdir and self.workdir and os.path.isdir(self.workdir):
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.timings["teardown_s"] = time.monotonic() - started


# ---- STUN responder (RFC 5389 Binding, run inside "wan") ------------------------

def stun_answer(request, sender):
    """Return the Binding success response for `request` from `sender`, or None.

    Tells the truth: XOR-MAPPED-ADDRESS (and MAPPED-ADDRESS for RFC 3489
    clients) is the address and port the request came from. CHANGE-REQUEST
    is ignored; the answer always leaves from the address asked.
    """
    if len(request) < 20 or request[0:2] != b"\x00\x01":
        return None
    address, port = socket.inet_aton(sender[0]), sender[1]
    xor_port = port ^ (STUN_MAGIC_COOKIE >> 16)
    xor_address = struct.pack("!I", struct.unpack("!I", address)[0] ^ STUN_MAGIC_COOKIE)
    attributes = (struct.pack("!HHBBH", 0x0020, 8, 0, 1, xor_port) + xor_address
                  + struct.pack("!HHBBH", 0x0001, 8, 0, 1, port) + address)
    return struct.pack("!HH", 0x0101, len(attributes)) + request[4:20] + attributes


def stun_serve(address, port, max_s):
    """Answer Binding requests on address:port for at most `max_s` seconds."""
    deadline = time.monotonic() + max_s
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((address, port))
        print("stun ready %s:%d" % sock.getsockname(), flush=True)
        while time.monotonic() < deadline:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                request, sender = sock.recvfrom(2048)
            except socket.timeout:
                break
            answer = stun_answer(request, sender)
            if answer:
                sock.sendto(answer, sender)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 4 or argv[0] != "stun":
        print("usage: nat_testbed.py stun ADDRESS PORT MAX_SECONDS", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return stun_serve(argv[1], int(argv[2]), float(argv[3]))


if __name__ == "__main__":
    sys.exit(main())
