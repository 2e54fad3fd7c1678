"""Token and state rules that must hold whatever happens (issue 11, points 4
and 6): a spent single-use token does nothing, also after a crash; one token
cannot take every port; tokens.conf and STATE_DIR are refused, not guessed;
a full disk is one line.

Real server processes on 127.0.0.1; a crash is a SIGKILL, or the state files
written as a crash would leave them."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import SERVER, ServerHandle, clean_env, free_port_range
from helpers import api, create_tunnel

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def call(server, method, path, body=None, secret=None):
    """(status, JSON body) of one API request."""
    return api(server, method, path, body, secret=secret).pair()


def create(server, token, protocols=("tcp",)):
    return create_tunnel(server, token, protocols)


def extend(server, tunnel, token):
    return call(server, "POST", "/tunnels/%s/extend" % tunnel["id"], {"token": token},
                secret=tunnel["secret"])


def write_tokens(state_dir, text, encoding="utf-8"):
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, "tokens.conf")
    with open(path, "w", encoding=encoding) as fh:
        fh.write(text)
    os.chmod(path, 0o600)
    return path


def admin(state_dir, *args, env=None, home=None):
    env = env or clean_env(home or os.path.join(state_dir, "..", "home"))
    return subprocess.run([sys.executable, SERVER, "--state-dir", state_dir] + list(args),
                          capture_output=True, text=True, timeout=60, env=env,
                          stdin=subprocess.DEVNULL)


def one_line_error(done, *words):
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# ---- single-use tokens -------------------------------------------------------------------------

def test_state_spent_unique_extend_token_extends_nothing(workdir):
    state = os.path.join(workdir, "state")
    write_tokens(state, "plain-token = lifespan:1h\n"
                        "once-extend = unique:true extend:true lifespan:1h\n"
                        "once-both = unique:true extend:true lifespan:1h max_ports:2\n")
    server = ServerHandle(workdir, state_dir=state)
    try:
        status, tunnel = create(server, "plain-token")
        assert status == 201, tunnel
        status, first = extend(server, tunnel, "once-extend")
        assert status == 200, first
        assert first["expires_at"] >= tunnel["expires_at"] + 3600
        for _ in range(2):  # spent: no more extensions, and the tunnel stays as it was
            status, body = extend(server, tunnel, "once-extend")
            assert status == 403 and "one use" in body["error"], body
        status, shown = call(server, "GET", "/tunnels/" + tunnel["id"], secret=tunnel["secret"])
        assert shown["expires_at"] == first["expires_at"]
        status, made = create(server, "once-both")  # spent by a creation ...
        assert status == 201, made
        status, body = extend(server, tunnel, "once-both")  # ... extends nothing either
        assert status == 403 and "one use" in body["error"], body
        server.restart(signal.SIGKILL)  # and stays spent
        status, body = extend(server, tunnel, "once-extend")
        assert status == 403, body
    finally:
        server.stop()


def used_tokens_path(state):
    return os.path.join(state, "used_tokens.json")


@pytest.mark.parametrize("delete_with", ["api", "cli"])
def test_state_unique_token_stays_spent_after_crash_between_files(workdir, delete_with):
    """The tunnel file is written, then the server dies before used_tokens.json:
    after the tunnel is deleted and the server restarts, the token is still spent."""
    state = os.path.join(workdir, "state")
    write_tokens(state, "only-once = unique:true lifespan:1h\n")
    server = ServerHandle(workdir, state_dir=state)
    status, tunnel = create(server, "only-once")
    assert status == 201, tunnel
    server.proc.stop(signal.SIGKILL)
    os.unlink(used_tokens_path(state))  # as the crash left it: the tunnel file only
    if delete_with == "cli":
        done = admin(state, "tunnels", "remove", tunnel["id"], home=os.path.join(workdir, "home"))
        assert done.returncode == 0, done.stderr
        server.start()
    else:
        server.start()
        status, body = call(server, "DELETE", "/tunnels/" + tunnel["id"], secret=tunnel["secret"])
        assert status == 200, body
    server.restart(signal.SIGKILL)
    status, body = create(server, "only-once")
    assert status == 403 and "one use" in body["error"], body
    server.stop()


def test_state_unique_token_spent_when_killed_right_after_creation(workdir):
    state = os.path.join(workdir, "state")
    write_tokens(state, "only-once = unique:true lifespan:1h\n")
    server = ServerHandle(workdir, state_dir=state)
    status, tunnel = create(server, "only-once")
    assert status == 201, tunnel
    server.restart(signal.SIGKILL)
    status, body = call(server, "DELETE", "/tunnels/" + tunnel["id"], secret=tunnel["secret"])
    assert status == 200, body
    server.restart(signal.SIGKILL)
    status, body = create(server, "only-once")
    assert status == 403, body
    server.stop()


# ---- tunnels per token -------------------------------------------------------------------------

def loaded_store(server_mod, tmp_path, ports):
    """(settings, Store) of a fresh state dir under tmp_path handing out `ports`."""
    settings = server_mod.load_settings(flags={
        "STATE_DIR": str(tmp_path / "state"), "LISTEN_ADDRESS": "127.0.0.1",
        "TUNNEL_PORTS": "%d..%d" % (ports[0], ports[-1])}, environ={})
    store = server_mod.Store(settings)
    store.load()
    return settings, store


def test_state_unique_token_use_not_written_leaves_no_tunnel(tmp_path, server_mod):
    """A single-use token whose use cannot be written to used_tokens.json
    creates nothing: no tunnel file, its ports free again, the token unspent."""
    ports = free_port_range(2)
    settings, store = loaded_store(server_mod, tmp_path, ports)
    os.makedirs(store.used_path)  # a directory in its place: the atomic write fails
    options = {"lifespan": 3600, "unique": True, "max_traffic": 0, "rate": 0}
    with pytest.raises(OSError):
        store.create("single-use-token", options, ["tcp"])
    assert os.listdir(settings.tunnel_dir) == [] and store.count() == 0
    os.rmdir(store.used_path)
    record, _secret = store.create("single-use-token", options, ["tcp"])
    assert record["ports"] == [ports[0]]
    assert os.listdir(settings.tunnel_dir) == [record["id"] + ".json"]


def test_state_tunnel_deleted_while_the_sweep_expires_it(tmp_path, server_mod):
    """An API thread deletes a tunnel while the sweep finds it expired: the
    delete waits for the store, and the sweep does not fail on a record gone
    between finding it due and counting it off its token (a sweep that
    raises is never scheduled again)."""
    ports = free_port_range(1)
    settings, store = loaded_store(server_mod, tmp_path, ports)
    options = {"lifespan": 1, "unique": False, "max_traffic": 0, "rate": 0}
    record, _secret = store.create("some-token", options, ["tcp"], now=time.time() - 10)
    deleter = threading.Thread(target=store.delete, args=(record["id"],), daemon=True)
    found_due = store.due

    def due_then_delete(*args):
        ids = found_due(*args)
        deleter.start()
        deleter.join(0.5)  # without the store held, the delete is done by now
        return ids
    store.due = due_then_delete
    assert store.expire(time.time()) == [record["id"]]
    deleter.join(10)
    assert not deleter.is_alive() and store.get(record["id"]) is None


def test_state_default_cap_on_tunnels_per_token(workdir, server_mod):
    state = os.path.join(workdir, "state")
    write_tokens(state, "tenant-token = lifespan:1h\nother-token = lifespan:1h\n")
    server = ServerHandle(workdir, state_dir=state, ports=None)
    try:
        cap = int(server_mod.CONFIG_KEYS["MAX_TUNNELS_PER_TOKEN"][0])
        assert 1 <= cap <= 100
        made = [create(server, "tenant-token") for _ in range(cap)]
        assert [status for status, _ in made] == [201] * cap, made[-1]
        status, body = create(server, "tenant-token")
        assert status == 403 and "MAX_TUNNELS_PER_TOKEN" in body["error"], body
        status, body = create(server, "other-token")  # the cap is per token
        assert status == 201, body
        shown = admin(state, "check-config", home=os.path.join(workdir, "home")).stdout
        assert "MAX_TUNNELS_PER_TOKEN=%d  # default" % cap in shown
    finally:
        server.stop()


# ---- tokens.conf is refused, not guessed --------------------------------------------------------

BAD_TOKENS = ("\ufeffbom-token = max_ports:2\n"                 # line 1: BOM
              "good-token = max_ports:1 lifespan:1h\n"          # line 2
              "twice-token = max_ports:1\n"                     # line 3
              "# a comment line is fine\n"                      # line 4
              "twice-token = max_ports:6\n"                     # line 5: duplicate
              "comment-token = max_ports:2 # for alice\n"       # line 6: trailing comment
              "hashed-token = max_ports:2 unique:true#x\n")     # line 7: trailing comment


def test_state_tokens_conf_bom_duplicate_trailing_comment_refused(workdir):
    state = os.path.join(workdir, "state")
    path = write_tokens(state, BAD_TOKENS)
    home = os.path.join(workdir, "home")
    done = admin(state, "check-config", home=home)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    for line, reason in ((1, "byte order mark"), (5, "also on line 3"), (6, "comment"),
                         (7, "comment")):
        assert "%s:%d: " % (path, line) in done.stderr and reason in done.stderr, done.stderr
    assert "%s:2:" % path not in done.stderr and "%s:3:" % path not in done.stderr
    server = ServerHandle(workdir, state_dir=state)
    try:
        for line in (1, 5, 6, 7):  # the server reports and skips; the rest load
            server.proc.wait_for(r"bad token line skipped at %s:%d: " % (path, line))
        assert create(server, "good-token")[0] == 201
        for name in ("bom-token", "\ufeffbom-token", "twice-token", "comment-token",
                     "hashed-token"):
            status, body = create(server, name)
            assert status == 403, (name, body)
    finally:
        server.stop()


def test_state_tokens_conf_good_file_passes_check_config(workdir):
    state = os.path.join(workdir, "state")
    write_tokens(state, "# tokens\ngood-token = max_ports:1\n\nother-token = unique:true\n")
    done = admin(state, "check-config", home=os.path.join(workdir, "home"))
    assert done.returncode == 0, done.stderr


# ---- STATE_DIR and the disk ----------------------------------------------------------------------

@pytest.mark.parametrize("command", [["check-config"], []])
@pytest.mark.parametrize("where", ["environment", "flag", "file"])
def test_state_blank_state_dir_refused_with_one_line(workdir, command, where):
    home = os.path.join(workdir, "home")
    env = clean_env(home)
    argv = [sys.executable, SERVER]
    if where == "environment":
        env["STATE_DIR"] = ""
    elif where == "flag":
        argv += ["--state-dir", ""]
    else:
        with open(os.path.join(home, "pipe2me.server.conf"), "w") as fh:
            fh.write("HTTP_PORT=0\nSTATE_DIR=\n")
    done = subprocess.run(argv + command, capture_output=True, text=True, timeout=60, env=env,
                          stdin=subprocess.DEVNULL, cwd=workdir)
    assert done.returncode == 2, (done.returncode, done.stderr)
    one_line_error(done, "STATE_DIR", "empty")
    if where == "file":
        assert "pipe2me.server.conf:2" in done.stderr


@pytest.mark.skipif(not IS_ROOT, reason="needs root: mounts a small tmpfs")
def test_state_tokens_add_on_full_disk_is_one_line(workdir):
    state = os.path.join(workdir, "state")
    os.makedirs(state)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", state],
                   check=True, timeout=30)
    try:
        path = write_tokens(state, "first-token = max_ports:1\n")
        with open(os.path.join(state, "filler"), "wb", buffering=0) as fh:
            with pytest.raises(OSError):
                for _ in range(1000):
                    fh.write(b"\0" * 4096)
        home = os.path.join(workdir, "home")
        for args in (["tokens", "add", "second-token", "max_ports:2"], ["tokens", "add"]):
            before = open(path).read()
            done = admin(state, *args, home=home)
            assert done.returncode == 3, (args, done.returncode, done.stderr)
            one_line_error(done, path, "No space left")
            assert open(path).read() == before
            assert sorted(os.listdir(state)) == ["filler", "tokens.conf"]  # no temp file left
    finally:
        subprocess.run(["umount", state], timeout=30)
