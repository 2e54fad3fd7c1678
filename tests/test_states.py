"""One vocabulary for states (issue 12 point 5): a tunnel is *connected* or
not, *expired* or not, *direct* or *relayed*, and every command and the API
say so with these words. `verify` = exists and not expired (also before any
`start`); `status` exits 0 only while `start` runs with its session up;
`tunnels list`/`show` and the API tell `connected`, since when or when last
seen; `check` prints REACH=direct|relayed."""

import json
import os
import re
import subprocess
import sys

from conftest import SERVER, echo_handler, run_pod, setup_pod, start_pod, wait_until
from helpers import api


def admin(server, *args):
    return subprocess.run([sys.executable, SERVER, "--state-dir", server.state_dir] + list(args),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def values(text):
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def listed(server, tunnel_id):
    """The `tunnels list` row of a tunnel as a dict of its columns."""
    done = admin(server, "tunnels", "list")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["ID", "FQDN", "EXPIRED", "CONNECTED", "SINCE", "SERVICES"]
    (row,) = [r for r in rows if r.startswith(tunnel_id)]
    return dict(zip(header.split(), row.split()))


def shown(server, tunnel_id):
    done = admin(server, "tunnels", "show", tunnel_id)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def from_api(server, pod_dir):
    info = values(open(os.path.join(pod_dir, "pipe2me.info.inc")).read())
    answer = api(server, "GET", "/tunnels/" + info["PIPE2ME_ID"].strip("'"),
                 secret=info["PIPE2ME_SECRET"].strip("'"))
    assert answer.status == 200, answer.body
    return answer.json()


ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def test_states_connected_expired_direct_relayed(server, workdir, services):
    service = services(echo_handler)
    pod_dir = os.path.join(workdir, "pod")
    fqdn = setup_pod(server, pod_dir, "tcp", [service.port])
    tunnel_id = values(run_pod(pod_dir, "env").stdout)["PIPE2ME_ID"].strip("'")

    # before any start: exists, not expired, not connected
    verified = run_pod(pod_dir, "verify")
    assert verified.returncode == 0 and verified.stdout.strip() == fqdn
    status = run_pod(pod_dir, "status")
    assert status.returncode == 3 and values(status.stdout)["CONNECTED"] == "no"
    assert listed(server, tunnel_id)["CONNECTED"] == "no"
    assert listed(server, tunnel_id)["EXPIRED"] == "no"
    assert listed(server, tunnel_id)["SINCE"] == "-"
    view = from_api(server, pod_dir)
    assert (view["connected"], view["expired"], view["last_seen"]) == (False, False, None)

    pod = start_pod(workdir, pod_dir)
    status = run_pod(pod_dir, "status")
    assert status.returncode == 0, status.stdout
    assert values(status.stdout)["CONNECTED"] == "yes"
    assert re.fullmatch(ISO, values(status.stdout)["SINCE"])
    view = from_api(server, pod_dir)
    assert view["connected"] is True and isinstance(view["connected_since"], int)
    row = wait_until(lambda: (lambda r: r if r["CONNECTED"] == "yes" else None)(
        listed(server, tunnel_id)), 10, what="tunnels list: connected")
    assert re.fullmatch(ISO, row["SINCE"])
    assert shown(server, tunnel_id)["connected"] is True
    checked = run_pod(pod_dir, "check", "--no-router")
    assert checked.returncode == 0, checked.stderr
    assert values(checked.stdout)["REACH"] == "relayed"  # the server cannot reach us directly
    assert values(checked.stdout)["STATUS"] == "offline"

    assert pod.stop() == 0
    status = run_pod(pod_dir, "status")
    assert status.returncode == 3 and values(status.stdout)["CONNECTED"] == "no"
    view = from_api(server, pod_dir)
    assert view["connected"] is False and isinstance(view["last_seen"], int)
    row = wait_until(lambda: (lambda r: r if r["CONNECTED"] == "no" else None)(
        listed(server, tunnel_id)), 10, what="tunnels list: not connected")
    assert re.fullmatch(ISO, row["SINCE"])  # last seen
    later = shown(server, tunnel_id)
    assert later["connected"] is False and later["last_seen"] == view["last_seen"]
    assert run_pod(pod_dir, "verify").returncode == 0  # still not expired

    # a deleted tunnel leaves nothing in the server's record of who was seen
    assert admin(server, "tunnels", "remove", tunnel_id).returncode == 0
    wait_until(lambda: tunnel_id not in presence_file(server), 10,
               what="connected.json to forget the deleted tunnel")


def presence_file(server):
    """connected.json as text ("" until the server has written it)."""
    try:
        with open(os.path.join(server.state_dir, "connected.json"), encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        return ""


def test_states_expired(server, workdir):
    added = admin(server, "tokens", "add", "short-lived", "max_ports:1", "lifespan:2")
    assert added.returncode == 0, added.stderr
    pod_dir = os.path.join(workdir, "pod")
    setup_pod(server, pod_dir, "tcp", [9], token="short-lived")
    tunnel_id = values(run_pod(pod_dir, "env").stdout)["PIPE2ME_ID"].strip("'")
    gone = wait_until(lambda: (lambda d: d if d.returncode else None)(run_pod(pod_dir, "verify")),
                      15, interval=0.5, what="verify to fail")
    assert gone.returncode == 4 and "expired" in gone.stderr
    assert listed(server, tunnel_id)["EXPIRED"] == "yes"
    assert from_api(server, pod_dir)["expired"] is True
