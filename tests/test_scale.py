"""The store's indexes and the expiry order (issue 14) keep what a full walk
used to give: listeners, ports, names and DNS follow each change and each
expiry, one tunnel at a time. Real server processes on 127.0.0.1; the
figures themselves come from bench/scale.py, not from here."""
import os

from conftest import ServerHandle, wait_until
from helpers import accepts, api
from test_state_rules import call, create, extend, write_tokens


def scale_server(workdir, tokens, *extra):
    state = os.path.join(workdir, "state")
    write_tokens(state, tokens)
    return ServerHandle(workdir, state_dir=state, extra=list(extra))


def test_scale_expiry_closes_listener_then_grace_returns_port_and_name(workdir):
    server = scale_server(workdir, "short-token = lifespan:3\nlong-token = lifespan:1h\n",
                          "--port-grace", "2")
    try:
        status, short = create(server, "short-token")
        assert status == 201, short
        wait_until(lambda: accepts(short["ports"][0]), timeout=10,
                   what="the new tunnel's listener (opened by the loop after the answer)")
        status, long_lived = create(server, "long-token")
        assert status == 201 and long_lived["ports"][0] > short["ports"][0], long_lived
        wait_until(lambda: not accepts(short["ports"][0]), timeout=10,
                   what="the expired tunnel's listener to close")
        assert call(server, "GET", "/tunnels/%s/verify" % short["id"])[0] == 410
        assert accepts(long_lived["ports"][0])  # the other tunnel is untouched
        wait_until(lambda: call(server, "GET", "/tunnels/%s/verify" % short["id"])[0] == 404,
                   timeout=10, what="the grace period to end")
        status, again = create(server, "long-token")  # the lowest free port is the freed one
        assert status == 201 and again["ports"] == short["ports"], (again, short)
        wait_until(lambda: accepts(again["ports"][0]), timeout=10,
                   what="the freed port's listener for the new tunnel")
    finally:
        server.stop()


def test_scale_extension_after_expiry_opens_the_listener_again(workdir):
    server = scale_server(workdir, "short-token = lifespan:3\nmore-token = extend:true lifespan:1h\n",
                          "--port-grace", "1h")
    try:
        status, tunnel = create(server, "short-token")
        assert status == 201, tunnel
        port = tunnel["ports"][0]
        wait_until(lambda: not accepts(port), timeout=10, what="the listener to close")
        status, body = extend(server, tunnel, "more-token")
        assert status == 200 and body["status"] == "online", body
        wait_until(lambda: accepts(port), timeout=10, what="the listener to open again")
        wait_until(lambda: accepts(port), timeout=1, what="the listener to stay open")
    finally:
        server.stop()


def test_scale_deleted_tunnel_frees_port_and_name_at_once(workdir):
    server = scale_server(workdir, "any-token = lifespan:1h\n")
    try:
        made = [create(server, "any-token")[1] for _ in range(3)]
        assert len({t["ports"][0] for t in made}) == 3
        first = made[0]
        status, body = call(server, "DELETE", "/tunnels/" + first["id"], secret=first["secret"])
        assert status == 200, body
        wait_until(lambda: not accepts(first["ports"][0]), timeout=5, what="the listener to close")
        status, again = create(server, "any-token")
        assert status == 201 and again["ports"] == first["ports"], (again, first)
        wait_until(lambda: accepts(again["ports"][0]), timeout=5, what="the new listener")
    finally:
        server.stop()


def test_scale_tunnels_survive_reload_and_restart_with_their_ports(workdir):
    server = scale_server(workdir, "any-token = lifespan:1h\n")
    try:
        made = [create(server, "any-token")[1] for _ in range(4)]
        server.restart()
        for tunnel in made:
            assert accepts(tunnel["ports"][0])
        status, more = create(server, "any-token")  # loaded ports are held
        assert status == 201 and more["ports"][0] not in {t["ports"][0] for t in made}
    finally:
        server.stop()


def test_scale_metrics_per_tunnel_series_can_be_turned_off(workdir):
    tokens = "any-token = lifespan:1h\n"
    server = scale_server(workdir, tokens)
    try:
        status, tunnel = create(server, "any-token")
        text = metrics(server)
        assert 'pipe2me_tunnel_bytes_total{fqdn="%s",direction="in"} 0' % tunnel["fqdn"] in text
        assert 'pipe2me_tunnels{status="online"} 1' in text
    finally:
        server.stop()
    server = ServerHandle(workdir, state_dir=server.state_dir,
                          extra=["--metrics-per-tunnel", "no"], name="server-no-series")
    try:
        text = metrics(server)
        assert "pipe2me_tunnel_bytes_total" not in text and tunnel["fqdn"] not in text
        assert 'pipe2me_tunnels{status="online"} 1' in text
    finally:
        server.stop()


def metrics(server):
    return api(server, "GET", "/metrics").body.decode()
