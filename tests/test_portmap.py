"""Tests of the pod's router port mapping (section ROUTER PORT MAPPING of
pipe2me_pod.py): NAT-PMP and UPnP IGD clients, PortMapper, and the keeper
that renews the leases while `start` runs.

Unit tests talk to fake NAT-PMP and UPnP servers on 127.0.0.1. End-to-end
tests build a real home network (tests/nat_testbed.py: namespaces, nftables
NAT, miniupnpd) and run the pod's code inside the "lan" namespace, under
Python 3.8 when this machine has it, then check from "wan" that the
router really forwards. Those need root (they skip otherwise).
"""

import glob
import http.server
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import nat_testbed
from conftest import POD, load_script
from helpers import RawHttp, raises_within

pm = load_script(POD, "pipe2me_pod")

FQDN = "calm-teal-otter.pipe2.localhost"


def find_python38():
    """Return a working python3.8 interpreter path, or None."""
    candidates = [os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8"),
                  "/usr/bin/python3.8", "/usr/local/bin/python3.8"]
    for pattern in candidates:
        for path in sorted(glob.glob(pattern)):
            done = subprocess.run([path, "-c", "import ssl"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
            if done.returncode == 0:
                return path
    return None


POD_PYTHON = find_python38() or sys.executable


# ---- fakes on 127.0.0.1 -------------------------------------------------------

class FakeNatPmp:
    """A NAT-PMP server on 127.0.0.1:<free port> driven by `answer(request, n)`.

    `answer` returns bytes to send back or None to stay silent; `requests`
    records what arrived. The serving thread stops at close() or after 30 s.
    """

    def __init__(self, answer):
        self.answer, self.requests = answer, []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        deadline = time.monotonic() + 30
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                data, sender = self.sock.recvfrom(64)
            except socket.timeout:
                continue
            self.requests.append((time.monotonic(), data))
            reply = self.answer(data, len(self.requests))
            if reply is not None:
                self.sock.sendto(reply, sender)

    def close(self):
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def fake_natpmp():
    made = []

    def make(answer):
        made.append(FakeNatPmp(answer))
        return made[-1]
    yield make
    for fake in made:
        fake.close()


def map_answer(request, result=0, external=None, lifetime=None, internal=None):
    _, op, _, req_internal, req_external, req_lifetime = struct.unpack("!BBHHHI", request)
    return struct.pack("!BBHIHHI", 0, 128 + op, result, 1234,
                       req_internal if internal is None else internal,
                       req_external if external is None else external,
                       req_lifetime if lifetime is None else lifetime)


class FakeIgd(http.server.BaseHTTPRequestHandler):
    """A UPnP IGD description and control URL; `soap` decides each answer."""

    description = b""
    soap = None
    calls = []

    def do_GET(self):
        self._send(200, self.description)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls.append((self.path, self.headers["SOAPAction"], body.decode()))
        status, text = type(self).soap(self.headers["SOAPAction"], body.decode())
        self._send(status, text.encode())

    def _send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_igd():
    server = http.server.HTTPServer(("127.0.0.1", 0), FakeIgd)
    FakeIgd.calls = []
    FakeIgd.description = IGD_DESCRIPTION.encode()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d" % server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


IGD_DESCRIPTION = """<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><URLBase>{base}</URLBase><device>
<deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
<serviceList><service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>
<controlURL>/ctl/L3F</controlURL></service></serviceList>
<deviceList><device><deviceList><device><serviceList>
<service><serviceType>urn:schemas-upnp-org:service:WANPPPConnection:1</serviceType>
<controlURL>/ctl/PPPConn</controlURL></service>
<service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
<controlURL>ctl/IPConn</controlURL></service>
</serviceList></device></deviceList></device></deviceList></device></root>"""


def soap_ok(action, fields=""):
    return 200, ('<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
                 '<s:Body><u:%sResponse xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1">'
                 '%s</u:%sResponse></s:Body></s:Envelope>' % (action, fields, action))


def soap_fault(code, description):
    return 500, ('<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
                 '<s:Body><s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring>'
                 '<detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>%d</errorCode>'
                 '<errorDescription>%s</errorDescription></UPnPError></detail></s:Fault></s:Body>'
                 '</s:Envelope>' % (code, description))


# ---- unit tests ------------------------------------------------------------------

def test_portmap_natpmp_schedule_follows_rfc6886():
    assert pm.natpmp_schedule(1000) == [0.25 * 2 ** i for i in range(9)]
    assert sum(pm.natpmp_schedule(1000)) == 127.75
    assert pm.natpmp_schedule(1.0) == [0.25, 0.5, 0.25]
    assert pm.natpmp_schedule(0) and sum(pm.natpmp_schedule(0)) <= 0.01


def test_portmap_default_gateway_reads_route_table(tmp_path):
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth1\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
        "eth0\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
        "eth0\t0000A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n")
    assert pm.default_gateway(str(table)) == "192.168.0.1"
    table.write_text("Iface\tDestination\tGateway\n")
    assert pm.default_gateway(str(table)) is None
    assert pm.default_gateway(str(tmp_path / "missing")) is None


def test_portmap_natpmp_retransmits_and_ignores_stray_answers(fake_natpmp):
    def answer(request, n):
        if n == 1:
            return None                                     # lost: client must resend
        if n == 2:
            return map_answer(request, internal=9999)       # not ours: ignored
        return map_answer(request, lifetime=300)
    fake = fake_natpmp(answer)
    started = time.monotonic()
    assert pm.natpmp_map("127.0.0.1", 8100, 10000, 600, timeout_s=3, port=fake.port) == (10000, 300)
    assert 0.2 < time.monotonic() - started < 2.0
    assert [r for _, r in fake.requests][0] == struct.pack("!BBHHHI", 0, 2, 0, 8100, 10000, 600)
    assert len(fake.requests) == 3
    assert fake.requests[1][0] - fake.requests[0][0] >= 0.24


def test_portmap_natpmp_result_code_becomes_clear_error(fake_natpmp):
    fake = fake_natpmp(lambda request, n: map_answer(request, result=2))
    with pytest.raises(pm.PortMapError) as caught:
        pm.natpmp_map("127.0.0.1", 8100, 10000, 600, timeout_s=2, port=fake.port)
    message = str(caught.value)
    assert "refused" in message and "not authorized" in message and "\n" not in message
    assert caught.value.code == 2 and caught.value.exit_code == 3
    assert isinstance(caught.value, pm.Unavailable)


def test_portmap_natpmp_silence_gives_up_within_timeout(fake_natpmp):
    fake = fake_natpmp(lambda request, n: None)
    started = time.monotonic()
    with pytest.raises(pm.PortMapError, match="no NAT-PMP answer"):
        pm.natpmp_external_address("127.0.0.1", timeout_s=0.8, port=fake.port)
    assert 0.75 < time.monotonic() - started < 1.5
    assert len(fake.requests) == 3                      # 0.25 + 0.5 + 0.05


def test_portmap_natpmp_closed_port_fails_fast():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(pm.PortMapError, match="port closed"):
        pm.natpmp_external_address("127.0.0.1", timeout_s=5, port=port)
    assert time.monotonic() - started < 1.0


def test_portmap_natpmp_delete_sends_zero_port_and_lifetime(fake_natpmp):
    fake = fake_natpmp(lambda request, n: map_answer(request))
    pm.natpmp_unmap("127.0.0.1", 8100, timeout_s=2, port=fake.port)
    assert fake.requests[0][1] == struct.pack("!BBHHHI", 0, 2, 0, 8100, 0, 0)


def test_portmap_upnp_finds_wanip_service_and_maps(fake_igd):
    FakeIgd.description = IGD_DESCRIPTION.format(base=fake_igd + "/").encode()
    FakeIgd.soap = staticmethod(lambda action, body: soap_ok(
        action.strip('"').split("#")[1],
        "<NewExternalIPAddress>10.9.8.7</NewExternalIPAddress>"))
    service = pm.upnp_find_service(fake_igd + "/rootDesc.xml", timeout_s=2)
    assert service.control_url == fake_igd + "/ctl/IPConn"
    assert service.service_type == "urn:schemas-upnp-org:service:WANIPConnection:1"
    assert pm.upnp_external_address(service, 2) == "10.9.8.7"
    assert pm.upnp_map(service, "192.168.1.10", 8100, 10000, 600, "pipe2me " + FQDN, 2) == 600
    path, action, body = FakeIgd.calls[-1]
    assert path == "/ctl/IPConn"
    assert action == '"urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping"'
    for field in ("<NewRemoteHost></NewRemoteHost>", "<NewExternalPort>10000</NewExternalPort>",
                  "<NewProtocol>TCP</NewProtocol>", "<NewInternalPort>8100</NewInternalPort>",
                  "<NewInternalClient>192.168.1.10</NewInternalClient>", "<NewEnabled>1</NewEnabled>",
                  "<NewPortMappingDescription>pipe2me %s</NewPortMappingDescription>" % FQDN,
                  "<NewLeaseDuration>600</NewLeaseDuration>"):
        assert field in body


def test_portmap_upnp_refuses_control_url_on_another_host(fake_igd):
    FakeIgd.description = IGD_DESCRIPTION.format(base="http://192.0.2.9:80/").encode()
    with pytest.raises(pm.PortMapError, match="control URL elsewhere"):
        pm.upnp_find_service(fake_igd + "/rootDesc.xml", timeout_s=2)
    assert FakeIgd.calls == []


def test_portmap_ssdp_answer_with_a_url_that_does_not_parse_is_ignored():
    """Any LAN host may answer an M-SEARCH: a LOCATION urlsplit refuses is
    no answer (it used to end `map-ports` and the renewal thread)."""
    answer = (b"HTTP/1.1 200 OK\r\nLOCATION: http://[127.0.0.1/rootDesc.xml\r\n"
              b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n")
    assert pm.ssdp_location(answer, "127.0.0.1") is None
    good = answer.replace(b"[127.0.0.1", b"127.0.0.1:5000")
    assert pm.ssdp_location(good, "127.0.0.1") == "http://127.0.0.1:5000/rootDesc.xml"


NOT_HTTP = b"SSH-2.0-OpenSSH_9.6\r\n"


def test_portmap_upnp_broken_http_from_a_lan_host_is_a_port_map_error():
    """Any LAN host may answer SSDP: a status line http.client cannot read (an
    HTTPException, not an OSError) is a PortMapError, not an exception that
    ends `map-ports` or the renewal thread of `start`."""
    raw = RawHttp(NOT_HTTP)
    service = pm.UpnpService(raw.url + "/ctl", "urn:schemas-upnp-org:service:WANIPConnection:1",
                             raw.url + "/rootDesc.xml")
    with pytest.raises(pm.PortMapError):
        pm.upnp_find_service(raw.url + "/rootDesc.xml", timeout_s=2)
    with pytest.raises(pm.PortMapError):
        pm.upnp_map(service, "192.168.1.10", 8100, 10000, 600, "pipe2me x", 2)
    raw.close()


def test_portmap_upnp_lan_host_that_trickles_its_answer_is_cut_at_the_deadline():
    """A LAN host that answers SSDP and then sends its description's body a byte every
    0.2 s: upnp_find_service gives up at its timeout, in all (urllib's timeout
    bounds each read, so the renewal thread of `start` was held for minutes)."""
    body = IGD_DESCRIPTION.format(base="http://127.0.0.1:1").encode()
    raw = RawHttp(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
                  gap_s=0.2)
    try:
        error = raises_within(lambda: pm.upnp_find_service(raw.url + "/rootDesc.xml", timeout_s=1),
                              pm.PortMapError, 15)
    finally:
        raw.close()
    assert "timed out after 1 s" in error, error


@pytest.mark.parametrize("control_url", ["/ctl/IP Conn", "http://[::1/ctl", "//[bad/ctl"])
def test_portmap_upnp_control_url_urllib_cannot_use_is_a_port_map_error(fake_igd, control_url):
    """A description whose control URL has a space, or a bracket urljoin
    refuses: a PortMapError (InvalidURL and ValueError got out)."""
    FakeIgd.description = IGD_DESCRIPTION.format(base=fake_igd).replace(
        "ctl/IPConn", control_url).encode()
    FakeIgd.soap = staticmethod(lambda action, body: soap_ok(
        action.strip('"').split("#")[1], "<NewExternalIPAddress>10.9.8.7</NewExternalIPAddress>"))
    with pytest.raises(pm.PortMapError):
        pm.upnp_external_address(pm.upnp_find_service(fake_igd + "/rootDesc.xml", timeout_s=2), 2)


def test_portmap_keeper_renewal_goes_on_after_a_router_http_cannot_read(tmp_path):
    """The renewal thread of `start` against a router whose saved control URL
    answers broken HTTP: logged, and the next try is scheduled (the thread
    ended on the exception and the mappings were never renewed again)."""
    raw = RawHttp(NOT_HTTP)
    state = {"version": 1, "fqdn": FQDN, "method": "upnp", "gateway": "127.0.0.1",
             "used": "upnp", "external_address": "203.0.113.7", "lease_end": 0,
             "mappings": [[8100, 10000]], "lifetime_s": 600,
             "upnp": [raw.url + "/ctl", "urn:schemas-upnp-org:service:WANIPConnection:1",
                      raw.url + "/rootDesc.xml"]}
    keeper = pm.PortMapKeeper(str(tmp_path), state)
    keeper.mapper.gateway, keeper.mapper.timeout_s = "127.0.0.1", 1.0
    keeper.mapper.upnp = pm.UpnpService(*state["upnp"])
    keeper.loop = pm.EventLoop()
    keeper.renew_in_thread()
    assert len(keeper.loop.soon) == 1   # the retry, scheduled
    raw.close()


def test_portmap_upnp_fault_becomes_clear_error(fake_igd):
    FakeIgd.description = IGD_DESCRIPTION.format(base=fake_igd).encode()
    FakeIgd.soap = staticmethod(lambda action, body: soap_fault(718, "ConflictInMappingEntry"))
    service = pm.upnp_find_service(fake_igd + "/rootDesc.xml", timeout_s=2)
    with pytest.raises(pm.PortMapError) as caught:
        pm.upnp_map(service, "192.168.1.10", 8100, 10000, 600, "pipe2me x", 2)
    assert caught.value.code == 718 and "another host" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_portmap_upnp_permanent_only_router_gets_lease_zero(fake_igd):
    FakeIgd.description = IGD_DESCRIPTION.format(base=fake_igd).encode()

    def soap(action, body):
        if "<NewLeaseDuration>0<" in body:
            return soap_ok("AddPortMapping")
        return soap_fault(725, "OnlyPermanentLeasesSupported")
    FakeIgd.soap = staticmethod(soap)
    service = pm.upnp_find_service(fake_igd + "/rootDesc.xml", timeout_s=2)
    assert pm.upnp_map(service, "192.168.1.10", 8100, 10000, 600, "pipe2me x", 2) == 0
    assert len(FakeIgd.calls) == 2


def test_portmap_upnp_private_or_empty_external_address(fake_igd):
    FakeIgd.description = IGD_DESCRIPTION.format(base=fake_igd).encode()
    service = pm.upnp_find_service(fake_igd + "/rootDesc.xml", timeout_s=2)
    FakeIgd.soap = staticmethod(lambda action, body: soap_ok(
        "GetExternalIPAddress", "<NewExternalIPAddress>10.0.0.2</NewExternalIPAddress>"))
    assert pm.upnp_external_address(service, 2) == "10.0.0.2"      # behind another NAT: accepted
    FakeIgd.soap = staticmethod(lambda action, body: soap_ok(
        "GetExternalIPAddress", "<NewExternalIPAddress></NewExternalIPAddress>"))
    with pytest.raises(pm.PortMapError, match="no external address"):
        pm.upnp_external_address(service, 2)


def test_portmap_upnp_external_address_with_text_after_it(fake_igd):
    """glibc's inet_aton takes '1.2.3.4' followed by a space and anything: the
    address is kept in its dotted form alone, so no text of a LAN host (here a
    C1 CSI, which XML allows) reaches map-ports' EXTERNAL_ADDRESS, the port map
    file or the server's check."""
    FakeIgd.description = IGD_DESCRIPTION.format(base=fake_igd).encode()
    service = pm.upnp_find_service(fake_igd + "/rootDesc.xml", timeout_s=2)
    FakeIgd.soap = staticmethod(lambda action, body: soap_ok(
        "GetExternalIPAddress", "<NewExternalIPAddress>10.9.8.7 \x9b2J</NewExternalIPAddress>"))
    assert pm.upnp_external_address(service, 2) == "10.9.8.7"


def test_portmap_mapper_rolls_back_when_router_gives_other_port(fake_natpmp):
    def answer(request, n):
        if request[:2] == b"\x00\x00":
            return struct.pack("!BBHI4s", 0, 128, 0, 1, socket.inet_aton("10.9.8.7"))
        _, _, _, internal, external, lifetime = struct.unpack("!BBHHHI", request)
        return map_answer(request, external=external + 1 if internal == 8101 else None)
    fake = fake_natpmp(answer)
    mapper = pm.PortMapper(FQDN, gateway="127.0.0.1", method="natpmp", timeout_s=1)
    mapper.natpmp_port = fake.port
    with pytest.raises(pm.PortMapError, match="not 10001"):
        mapper.map_all([(8100, 10000), (8101, 10001)], 600)
    deletes = [struct.unpack("!BBHHHI", r)[3] for _, r in fake.requests
               if len(r) == 12 and r[-4:] == b"\x00\x00\x00\x00"]
    assert sorted(deletes) == [8100, 8101]
    assert mapper.result is None and not mapper.renew_due()


def test_portmap_mapper_result_and_renewal(fake_natpmp):
    def answer(request, n):
        if request[:2] == b"\x00\x00":
            return struct.pack("!BBHI4s", 0, 128, 0, 1, socket.inet_aton("10.9.8.7"))
        return map_answer(request, lifetime=400)
    fake = fake_natpmp(answer)
    clock = [1000.0]
    mapper = pm.PortMapper(FQDN, gateway="127.0.0.1", method="auto", timeout_s=1,
                           clock=lambda: clock[0])
    mapper.natpmp_port = fake.port
    result = mapper.map_all([(8100, 10000)], 600)
    assert result == pm.PortMapResult("natpmp", "10.9.8.7", 1400.0, [(8100, 10000)])
    assert not mapper.renew_due(1199) and mapper.renew_due(1200)
    mapper.unmap_all()
    mapper.unmap_all()                                  # idempotent: nothing sent
    assert len([r for _, r in fake.requests if r[-4:] == b"\x00\x00\x00\x00"]) == 1
    assert not mapper.renew_due(5000)


def test_portmap_mapper_renewal_drops_pairs_no_longer_wanted(fake_natpmp):
    def answer(request, n):
        if request[:2] == b"\x00\x00":
            return struct.pack("!BBHI4s", 0, 128, 0, 1, socket.inet_aton("10.9.8.7"))
        return map_answer(request)
    fake = fake_natpmp(answer)
    mapper = pm.PortMapper(FQDN, gateway="127.0.0.1", method="natpmp", timeout_s=1)
    mapper.natpmp_port = fake.port
    mapper.map_all([(8100, 10000), (8101, 10001)], 600)
    del fake.requests[:]
    assert mapper.map_all([(8100, 10000)], 600).mappings == [(8100, 10000)]
    sent = [struct.unpack("!BBHHHI", r)[3:] for _, r in fake.requests if len(r) == 12]
    assert sent == [(8100, 10000, 600), (8101, 0, 0)]    # renew the kept pair, delete the other


def test_portmap_mapper_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pm.PortMapper(FQDN, method="pcp")
    with pytest.raises(ValueError):
        pm.PortMapper(FQDN, gateway="127.0.0.1").map_all([(0, 10000)])


def natpmp_router(lifetime):
    """An answer function for FakeNatPmp: external address 203.0.113.7, every
    mapping granted as asked but with `lifetime` seconds."""
    def answer(request, _count):
        if request[1] == 0:
            return struct.pack("!BBHI4s", 0, 128, 0, 1234, socket.inet_aton("203.0.113.7"))
        return map_answer(request, lifetime=0 if request[-4:] == b"\0\0\0\0" else lifetime)
    return answer


def test_portmap_state_round_trips_and_unmaps(fake_natpmp, tmp_path):
    fake = fake_natpmp(natpmp_router(60))
    mapper = pm.PortMapper(FQDN, gateway="127.0.0.1", method="natpmp", timeout_s=1.0)
    mapper.natpmp_port = fake.port
    mapper.map_all([(8100, 10000), (8101, 10001)], 60)
    pm.save_portmap(str(tmp_path), mapper, 60)
    state = pm.load_portmap(str(tmp_path))
    assert state["external_address"] == "203.0.113.7" and state["lifetime_s"] == 60
    assert state["mappings"] == [[8100, 10000], [8101, 10001]] and state["used"] == "natpmp"
    again = pm.PortMapper.from_state(state, timeout_s=1.0)
    again.natpmp_port = fake.port
    assert again.result._replace(lease_end=int(again.result.lease_end)) == \
        mapper.result._replace(lease_end=int(mapper.result.lease_end))
    assert not again.renew_due()
    before = len(fake.requests)
    again.unmap_all()
    deletes = [struct.unpack("!BBHHHI", data) for _, data in fake.requests[before:]]
    assert [(d[3], d[4], d[5]) for d in deletes] == [(8100, 0, 0), (8101, 0, 0)]


SAVED_STATE = {"version": 1, "fqdn": FQDN, "method": "upnp", "gateway": "192.168.1.1",
               "used": "upnp", "external_address": "203.0.113.7", "lease_end": 0,
               "mappings": [[8100, 10000]], "lifetime_s": 600,
               "upnp": ["http://192.168.1.1/ctl", "urn:schemas-upnp-org:service:WANIPConnection:1",
                        "http://192.168.1.1/rootDesc.xml"]}


DAMAGED_FIELDS = [("method", "pcp"), ("gateway", 5), ("fqdn", None), ("mappings", [[8100]]),
                  ("mappings", [["a", "b"]]), ("mappings", [[0, 70000]]), ("lifetime_s", "x"),
                  ("upnp", [1]), ("upnp", "abc"), ("upnp", [1, 2, 3])]


@pytest.mark.parametrize("state", [{"used": "natpmp"}, [1]] + [
    dict(SAVED_STATE, **{key: value}) for key, value in DAMAGED_FIELDS])
def test_portmap_damaged_state_file_is_a_usage_error(tmp_path, state):
    """A saved state with any field `start`, `check` or `clear` reads damaged
    is one UsageError on loading (a method, gateway, port pair, lifetime or
    UPnP service that was not checked ended `clear` and `start` with a
    ValueError or TypeError traceback)."""
    assert pm.load_portmap(str(tmp_path)) is None
    (tmp_path / pm.PORTMAP_FILE).write_text(json.dumps(SAVED_STATE))
    assert pm.load_portmap(str(tmp_path)) == SAVED_STATE
    (tmp_path / pm.PORTMAP_FILE).write_text(json.dumps(state))
    with pytest.raises(pm.UsageError, match="is damaged .*map-ports"):
        pm.load_portmap(str(tmp_path))


def test_portmap_keeper_renews_at_half_lease_without_blocking_the_loop(fake_natpmp, tmp_path):
    """Leases of 2 s: the keeper maps at once, renews about every second from
    a thread (the loop keeps turning), saves each new lease, and removes the
    mappings on close(unmap=True)."""
    fake = fake_natpmp(natpmp_router(2))
    state = {"version": 1, "fqdn": FQDN, "method": "natpmp", "gateway": "127.0.0.1",
             "used": "natpmp", "external_address": "203.0.113.7", "lease_end": 0,
             "mappings": [[8100, 10000]], "upnp": None, "lifetime_s": 2}
    keeper = pm.PortMapKeeper(str(tmp_path), state)
    keeper.mapper.gateway, keeper.mapper.natpmp_port, keeper.mapper.timeout_s = "127.0.0.1", fake.port, 1.0
    loop = pm.EventLoop()
    ticks = []

    def tick():
        ticks.append(time.monotonic())
        loop.call_later(0.05, tick)
    loop.call_later(0, tick)
    keeper.start(loop)
    maps = lambda: [d for _, d in fake.requests if d[1] == 2 and d[-4:] != b"\0\0\0\0"]
    deadline = time.monotonic() + 10
    while len(maps()) < 3 and time.monotonic() < deadline:
        loop.run_once()
    assert len(maps()) >= 3, fake.requests
    times = [t for t, d in fake.requests if d[1] == 2]
    assert 0.6 < times[2] - times[1] < 2.0, times      # renewed at about half of 2 s
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert max(gaps) < 0.5, max(gaps)                  # the loop never waited on the router
    assert pm.load_portmap(str(tmp_path))["lease_end"] >= time.time()
    keeper.close(unmap=True)
    assert fake.requests[-1][1][-4:] == b"\0\0\0\0"  # lifetime 0: deleted
    assert os.path.exists(tmp_path / pm.PORTMAP_FILE)   # kept for the next start


def test_portmap_pod_loads_on_python38_without_side_effects():
    if POD_PYTHON == sys.executable and sys.version_info[:2] != (3, 8):
        pytest.skip("no Python 3.8 interpreter on this machine")
    code = ("import importlib.util, logging, sys, threading;"
            "spec = importlib.util.spec_from_file_location('pipe2me_pod', %r);"
            "pm = importlib.util.module_from_spec(spec); spec.loader.exec_module(pm);"
            "assert not logging.getLogger().handlers and not logging.getLogger('pipe2me.pod').handlers;"
            "assert threading.active_count() == 1;"
            "assert 'urllib.request' not in sys.modules and 'xml.etree.ElementTree' not in sys.modules;"
            "print(sys.version_info[:2])" % POD)
    done = subprocess.run([POD_PYTHON, "-c", code], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "(3, 8)"


# ---- end to end behind a real NAT --------------------------------------------------

# Runs in the "lan" namespace: maps, prints a JSON line, waits (bounded) for
# "unmap" on stdin, unmaps, prints another JSON line.
POD_DRIVER = r"""
import importlib.util, json, select, sys, time
spec = importlib.util.spec_from_file_location("pipe2me_pod", sys.argv[1])
pm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pm)
method, fqdn, lifetime = sys.argv[2], sys.argv[3], int(sys.argv[4])
pairs = [tuple(int(p) for p in pair.split(":")) for pair in sys.argv[5:]]
mapper = pm.PortMapper(fqdn, method=method, timeout_s=2.0)
started = time.monotonic()
try:
    result = mapper.map_all(pairs, lifetime)
except pm.Pipe2meError as e:
    print(json.dumps({"error": str(e), "exit_code": e.exit_code}), flush=True)
    sys.exit(e.exit_code)
print(json.dumps({"method": result.method, "external_address": result.external_address,
                  "lease_end": result.lease_end, "now": time.time(),
                  "elapsed_s": time.monotonic() - started, "gateway": mapper.gateway,
                  "renew_due_now": mapper.renew_due(),
                  "renew_due_half": mapper.renew_due(time.time() + lifetime / 2 + 1)}), flush=True)
if select.select([sys.stdin], [], [], 60)[0] and sys.stdin.readline().strip() == "unmap":
    mapper.unmap_all()
    print(json.dumps({"unmapped": True}), flush=True)
"""


class Pod:
    """The section running inside "lan" as a separate process."""

    def __init__(self, nat, method, pairs, lifetime_s=600):
        self.proc = nat.run_in("lan", [POD_PYTHON, "-c", POD_DRIVER, POD, method, FQDN,
                                       str(lifetime_s)] + ["%d:%d" % p for p in pairs],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True)

    def read(self, timeout_s=20):
        line = nat_testbed._read_line(self.proc, timeout_s)
        assert line, "pod driver said nothing; stderr: %s" % self._stderr()
        return json.loads(line)

    def unmap(self):
        self.proc.stdin.write("unmap\n")
        self.proc.stdin.flush()
        answer = self.read()
        assert self.proc.wait(10) == 0
        return answer

    def _stderr(self):
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.stderr.read()[-2000:]


@pytest.fixture(scope="module")
def nat():
    with nat_testbed.NatTestbed() as bed:
        yield bed


@pytest.fixture(scope="module")
def nat_without_natpmp():
    with nat_testbed.NatTestbed(natpmp=False) as bed:
        yield bed


def free_external_port():
    return random.randint(20000, 29999)


def assert_forwarded(nat, external_port, banner):
    ok, data = nat.probe_tcp("wan", nat.router_wan_ip, external_port)
    assert ok, "no connection through the router: %s" % data
    assert data == "%s %s\n" % (banner, nat.wan_ip)     # the consumer's address is kept


def assert_not_forwarded(nat, external_port):
    ok, data = nat.probe_tcp("wan", nat.router_wan_ip, external_port, timeout_s=2)
    assert not ok, "router still forwards port %d: %r" % (external_port, data)
    assert external_port not in nat.router_forwarded_ports()


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.parametrize("method", ["natpmp", "upnp"])
def test_portmap_maps_through_real_nat_and_unmaps(nat, method):
    internal, _server = nat.start_banner_server("lan", "pod-" + method)
    external = free_external_port()
    assert_not_forwarded(nat, external)
    pod = Pod(nat, method, [(internal, external)])
    mapped = pod.read()
    assert mapped.get("method") == method, mapped
    assert mapped["external_address"] == nat.router_wan_ip
    assert mapped["gateway"] == nat.router_lan_ip
    assert abs(mapped["lease_end"] - (mapped["now"] + 600)) < 5
    assert not mapped["renew_due_now"] and mapped["renew_due_half"]
    assert nat.router_forwarded_ports()[external] == "%s:%d" % (nat.lan_ip, internal)
    assert_forwarded(nat, external, "pod-" + method)
    assert pod.unmap() == {"unmapped": True}
    assert_not_forwarded(nat, external)
    if method == "upnp":
        assert "for: pipe2me %s" % FQDN in nat.miniupnpd_log()


@pytest.mark.slow
@pytest.mark.netns
def test_portmap_auto_prefers_natpmp(nat):
    internal, _server = nat.start_banner_server("lan", "pod-auto")
    external = free_external_port()
    pod = Pod(nat, "auto", [(internal, external)])
    assert pod.read()["method"] == "natpmp"
    assert_forwarded(nat, external, "pod-auto")
    pod.unmap()
    assert_not_forwarded(nat, external)


@pytest.mark.slow
@pytest.mark.netns
def test_portmap_auto_falls_back_to_upnp(nat_without_natpmp):
    nat = nat_without_natpmp
    internal, _server = nat.start_banner_server("lan", "pod-fallback")
    external = free_external_port()
    pod = Pod(nat, "auto", [(internal, external)])
    mapped = pod.read()
    assert mapped["method"] == "upnp" and mapped["external_address"] == nat.router_wan_ip
    assert mapped["elapsed_s"] < 5                      # NAT-PMP port closed: no long wait
    assert_forwarded(nat, external, "pod-fallback")
    pod.unmap()
    assert_not_forwarded(nat, external)


@pytest.mark.slow
@pytest.mark.netns
def test_portmap_forced_natpmp_without_natpmp_fails_clearly(nat_without_natpmp):
    pod = Pod(nat_without_natpmp, "natpmp", [(8100, free_external_port())])
    answer = pod.read()
    assert answer["exit_code"] == 3
    assert answer["error"].startswith("router port mapping failed: NAT-PMP: ")
    assert pod.proc.wait(10) == 3


@pytest.mark.slow
@pytest.mark.netns
def test_portmap_taken_port_is_refused_and_rolled_back(nat):
    internal, _server = nat.start_banner_server("lan", "first")
    external = free_external_port()
    first = Pod(nat, "natpmp", [(internal, external)])
    assert first.read()["method"] == "natpmp"
    second = Pod(nat, "natpmp", [(internal + 1 if internal < 65535 else internal - 1, external)])
    answer = second.read()
    assert "not %d" % external in answer["error"], answer
    assert nat.router_forwarded_ports() == {external: "%s:%d" % (nat.lan_ip, internal)}
    assert_forwarded(nat, external, "first")
    first.unmap()
    assert_not_forwarded(nat, external)


@pytest.mark.slow
@pytest.mark.netns
def test_portmap_remap_after_router_lost_mapping(nat):
    internal, _server = nat.start_banner_server("lan", "again")
    external = free_external_port()
    pod = Pod(nat, "natpmp", [(internal, external)])
    pod.read()
    nat.remove_mapping_at_router(external)
    assert_not_forwarded(nat, external)
    again = Pod(nat, "natpmp", [(internal, external)])
    assert again.read()["method"] == "natpmp"
    assert_forwarded(nat, external, "again")
    again.unmap()
    pod.unmap()
    assert_not_forwarded(nat, external)


@pytest.mark.slow
@pytest.mark.netns
def test_nat_testbed_tears_down_everything():
    bed = nat_testbed.NatTestbed()
    with bed:
        names = set(bed.ns.values())
        assert names <= set(subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE,
                                           universal_newlines=True, timeout=10).stdout.split())
        _port, server = bed.start_banner_server("lan", "x")
    assert server.returncode is not None
    listed = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE,
                            universal_newlines=True, timeout=10).stdout.split()
    assert not names & set(listed)
    assert bed.exit_codes["miniupnpd"] == 0
    assert not os.path.exists(bed.workdir)
    assert bed.timings["bring_up_s"] < 10 and bed.timings["teardown_s"] < 10
