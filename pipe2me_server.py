#!/usr/bin/env python3
# SPDX-License-Identifier: AGPL-3.0-only
"""pipe2me server: publishes TCP services of pods behind NAT under one domain.

Usage:
    python3 pipe2me_server.py [--config FILE] [--KEY-NAME VALUE ...]   run the server
    python3 pipe2me_server.py tokens list|add NAME [OPTION:VALUE ...]|remove NAME
    python3 pipe2me_server.py tunnels list|show ID|remove ID
    python3 pipe2me_server.py check-config | dns-refresh

Every pod gets a three-word name under TUNNEL_DOMAIN, one public port per
service, and a certificate for its name signed by the server's CA. Pods keep
one mutually authenticated TLS connection to TUNNEL_PORT; each consumer that
connects to a public port (or to the HTTP/HTTPS fronts by name) becomes a
stream multiplexed over that connection.

Sections, in the order a tunnel comes to life:
    SETTINGS      configuration keys, defaults, parsing and validation
    ERRORS        the exception tree and exit codes
    HELPERS       atomic files, shell format, logging helpers, name words
    SHARED protocol / SHARED relay   the wire contract and the selector relay,
                  byte-identical in pipe2me_pod.py
    TOKENS        tokens.conf: who may create tunnels, within which limits
    STATE STORE   STATE_DIR/tunnels/*.json and the port pool
    CERTIFICATES  the CA, CSR checks, signing through the openssl CLI
    API           the HTTP API (JSON and shell format)
    TUNNEL SESSIONS  pod authentication and the live session per tunnel
    FRONTS        public ports, the Host-routed HTTP front, the SNI front
    DNS           the built-in authoritative DNS responder
    WIRING        the Server object: listeners, signals, sweeps
    CLI           admin commands and main()

Glossary: server, pod, consumer (connects to a public port), tunnel (a pod's
name, ports and certificate), service (one protocol and port of a tunnel),
stream (one consumer connection carried to the pod), token, store, CA.

Requires Python 3.9+ and the openssl command-line tool.
"""

import argparse
import base64
import binascii
import calendar
import dataclasses
import collections
import contextlib
import enum
import errno
import fcntl
import hashlib
import heapq
import http.server
import ipaddress
import json
import logging
import os
import re
import resource
import secrets
import selectors
import shlex
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from typing import Dict, List, Optional, Sequence, Tuple

log = logging.getLogger("pipe2me.server")


# =====================================================================
# SETTINGS — configuration keys and their validation; read by everything
# =====================================================================

PROTOCOL_PORTS = ("http", "https", "imap", "imaps", "smtp", "smtps", "ssh", "tcp")
DEFAULT_CONFIG_FILE = "~/pipe2me.server.conf"
SWEEP_INTERVAL_S = 1.0            # expiry, deadlines and traffic bookkeeping
TRAFFIC_SAVE_INTERVAL_S = 30.0    # how often live byte counters reach the store
API_REQUEST_DEADLINE_S = 20.0     # a whole API request, against slowloris
API_MAX_BODY_BYTES = 64 * 1024
API_MAX_CONNECTIONS = 64
FRONT_SNIFF_BYTES = 16 * 1024     # request head / ClientHello limit on the fronts
FRONT_SNIFF_DEADLINE_S = 10.0
MAX_PENDING_HANDSHAKES = 64
BAD_TOKEN_LIMIT = 10              # failed token uses per address per window ...
BAD_TOKEN_WINDOW_S = 60.0         # ... before answering 429


def parse_domain(value):
    value = value.strip().lower().rstrip(".")
    if not is_hostname(value) or "." not in value and value != "localhost":
        raise ValueError("not a domain name: %r" % value)
    return value


def is_hostname(name):
    """True for an LDH host name of at most 253 characters."""
    labels = name.split(".")
    return (0 < len(name) <= 253 and all(
        re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", label) for label in labels))


def parse_port(value):
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError("port out of range: %s" % value)
    return port


def parse_optional_port(value):
    return parse_port(value) if value.strip() else None


def parse_port_range(value):
    """`a...b` excludes b, `a..b` includes it; returns range()."""
    match = re.fullmatch(r"\s*(\d+)\s*(\.\.\.?)\s*(\d+)\s*", value)
    if not match:
        raise ValueError("expected FIRST...END or FIRST..LAST, got %r" % value)
    first, last = int(match.group(1)), int(match.group(3))
    if match.group(2) == "...":
        last -= 1
    if not 1 <= first <= last <= 65535:
        raise ValueError("empty or out-of-range port range %r" % value)
    return range(first, last + 1)


def parse_address(value):
    return str(ipaddress.ip_address(value.strip()))


def parse_addresses(value):
    return [parse_address(v) for v in re.split(r"[\s,]+", value.strip()) if v]


def parse_path(value):
    return os.path.abspath(os.path.expanduser(value)) if value.strip() else ""


def parse_duration(value):
    """Seconds, or a number with an s/m/h/d suffix."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", str(value))
    if not match:
        raise ValueError("not a duration: %r" % value)
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return int(match.group(1)) * unit


def parse_positive_duration(value):
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0 seconds")
    return seconds


def parse_count(value):
    count = int(value)
    if count < 0:
        raise ValueError("must not be negative")
    return count


def parse_dns_service(value):
    value = value.strip()
    if value in ("", "builtin"):
        return value
    parts = value.split(":")
    if parts[0] != "dnsimple" or len(parts) not in (2, 3) or not parts[1]:
        raise ValueError("expected empty, 'builtin' or 'dnsimple:TOKEN[:ACCOUNT]'")
    return value


# key: (default, parser, one-line description for check-config and the example)
CONFIG_KEYS = {
    "TUNNEL_DOMAIN": ("pipe2.localhost", parse_domain, "the managed domain"),
    "TUNNEL_PORTS": ("10000...15000", parse_port_range, "public port range"),
    "DYNAMIC_DNS_SERVICE": ("", parse_dns_service, "dnsimple:TOKEN[:ACCOUNT], builtin, or empty"),
    "DNSIMPLE_API_URL": ("https://api.dnsimple.com", lambda v: v.strip().rstrip("/"), "dnsimple API base URL"),
    "STATE_DIR": ("~/.pipe2me-server", parse_path, "where all server state lives"),
    "LISTEN_ADDRESS": ("0.0.0.0", parse_address, "address all listeners bind"),
    "PUBLIC_ADDRESS": ("", parse_addresses, "the server's public IPv4 and/or IPv6"),
    "HTTP_PORT": ("8080", parse_port, "HTTP front and API"),
    "HTTPS_PORT": ("8443", parse_port, "HTTPS front (SNI passthrough) and API over TLS"),
    "TUNNEL_PORT": ("8444", parse_port, "where pods connect"),
    "DNS_PORT": ("", parse_optional_port, "built-in DNS responder port; empty = off"),
    "TOKENS_FILE": ("", parse_path, "auth tokens; default $STATE_DIR/tokens.conf"),
    "CA_CERT": ("", parse_path, "operator-supplied intermediate CA certificate (+ chain)"),
    "CA_KEY": ("", parse_path, "its private key"),
    "HEARTBEAT_INTERVAL": ("10", parse_positive_duration, "seconds between pings; 3x silent = dead"),
    "PORT_GRACE": ("1h", parse_duration, "how long an expired tunnel keeps its ports and name"),
    "SHUTDOWN_GRACE": ("10", parse_duration, "how long SIGTERM lets running streams finish"),
    "MAX_STREAMS_PER_TUNNEL": ("10000", parse_count, "open streams per tunnel; 0 = no cap"),
    "MAX_TUNNELS_PER_TOKEN": ("0", parse_count, "live tunnels per token; 0 = no cap"),
    "STREAM_IDLE_TIMEOUT": ("0", parse_duration, "close streams idle this long; 0 = never"),
}


class Settings:
    """Validated configuration: one attribute per key, lower-cased."""

    def __init__(self, values, origins):
        self.origins = origins  # key -> "file:line", "environment" or "default"
        for key, value in values.items():
            setattr(self, key.lower(), value)
        if not self.tokens_file:
            self.tokens_file = os.path.join(self.state_dir, "tokens.conf")

    @property
    def tunnel_dir(self):
        return os.path.join(self.state_dir, "tunnels")


def read_config_file(path):
    """Return {KEY: (raw value, "file:line")} from KEY=value lines."""
    entries = {}
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError("cannot read config %s: %s" % (path, exc)) from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = "%s:%d" % (path, number)
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep:
            raise UsageError("%s: expected KEY=value" % where)
        if key not in CONFIG_KEYS:
            raise UsageError("%s: unknown key %s" % (where, key))
        entries[key] = (unquote(value.strip()), where)
    return entries


def unquote(value):
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def load_settings(config_path=None, flags=None, environ=None):
    """Defaults < config file < environment < flags; raises UsageError naming the source."""
    environ = os.environ if environ is None else environ
    path = config_path or os.path.expanduser(DEFAULT_CONFIG_FILE)
    if config_path and not os.path.exists(config_path):
        raise UsageError("config file %s does not exist" % config_path)
    raw = {key: (default, "default") for key, (default, _, _) in CONFIG_KEYS.items()}
    if os.path.exists(path):
        raw.update(read_config_file(path))
    raw.update({k: (environ[k], "environment %s" % k) for k in CONFIG_KEYS if k in environ})
    raw.update({k: (v, "flag --%s" % k.lower().replace("_", "-"))
                for k, v in (flags or {}).items() if v is not None})
    values = {}
    for key, (value, origin) in raw.items():
        try:
            values[key] = CONFIG_KEYS[key][1](value)
        except ValueError as exc:
            raise UsageError("%s: bad %s: %s" % (origin, key, exc)) from None
    return Settings(values, {k: o for k, (_, o) in raw.items()})


# =====================================================================
# ERRORS — the exception tree; main() turns these into one line and an exit code
# =====================================================================

class Pipe2meError(Exception):
    """An expected failure: main() prints the message alone and exits exit_code."""
    exit_code = 1
    http_status = 500


class UsageError(Pipe2meError):
    exit_code = 2
    http_status = 400


class Unavailable(Pipe2meError):
    exit_code = 3
    http_status = 503


class Rejected(Pipe2meError):
    exit_code = 4
    http_status = 403


class NotFound(Rejected):
    http_status = 404


class Expired(Rejected):
    http_status = 410


class CertRefused(Rejected):
    http_status = 400


# =====================================================================
# HELPERS — files written atomically, shell format, name words
# =====================================================================

def write_atomic(path, data, mode=0o644):
    """Replace path with data so that a crash leaves the old or the new file, whole."""
    if isinstance(data, str):
        data = data.encode()
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path, obj, mode=0o644):
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n", mode)


def read_json(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def shell_format(obj, prefix=""):
    """key=value lines (shell-quoted); lists become key_0, key_1, ..."""
    lines = []
    for key, value in obj.items():
        if isinstance(value, (list, tuple)):
            lines += ["%s%s_%d=%s" % (prefix, key, i, shlex.quote(str(v)))
                      for i, v in enumerate(value)]
        elif isinstance(value, dict):
            continue
        else:
            text = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            lines.append("%s%s=%s" % (prefix, key, shlex.quote(text)))
    return "\n".join(lines) + "\n"


def mask_secret(secret):
    return secret[:4] + "…" if len(secret) > 8 else "…"


def sha256_hex(data):
    return hashlib.sha256(data if isinstance(data, bytes) else data.encode()).hexdigest()


MOODS = """able agile amber balmy blithe bold brave breezy bright calm candid cheery
chill civil clever cosmic cozy crisp curious daring dapper deft eager earnest easy
epic fair fancy fearless fierce fond frank free fresh gentle giddy glad gleeful
golden grand happy hardy hearty honest humble jolly jovial keen kind lively
loyal lucky lunar merry mighty mellow modest neat nimble noble peppy perky placid
plucky polite proud quick quiet quirky radiant rapid ready regal robust rosy
serene sharp shiny sincere smart snappy snug sober solar spry steady sturdy sunny
swift tender tidy tranquil trusty upbeat valiant vivid warm wise witty zany zesty""".split()
COLORS = """amber azure beige black blue bronze brown cerise cobalt copper coral cream
crimson cyan denim ebony emerald fawn fuchsia garnet gold gray green hazel indigo
ivory jade khaki lava lemon lilac lime magenta maroon mauve mint navy ochre olive
onyx orange orchid peach pearl pink plum purple red rose ruby rust saffron sage
salmon sand scarlet sepia sienna silver slate tan teal topaz umber violet white
wine yellow""".split()
ANIMALS = """alpaca badger beaver bison bobcat camel caribou cheetah cobra condor cougar
coyote crane dingo dolphin donkey eagle falcon ferret finch gazelle gecko gibbon
giraffe goose gopher heron hippo hyena ibex iguana jackal jaguar koala lemur
leopard lizard llama lynx marmot marten mink moose narwhal newt ocelot octopus
orca otter owl panda panther parrot pelican penguin puffin puma quail rabbit
raccoon raven salmon seal shark sloth stork swan tapir tiger toucan turtle
unicorn viper walrus weasel whale wolf wombat yak zebra""".split()


def three_words():
    pick = secrets.choice
    return "%s-%s-%s" % (pick(MOODS), pick(COLORS), pick(ANIMALS))

# ---- BEGIN SHARED protocol (identical in pipe2me_server.py and pipe2me_pod.py) ----
# The tunnel connection: the pod dials TUNNEL_PORT, both sides authenticate with
# TLS certificates of the server's CA, then speak frames until either side closes.
#
#   frame  = type (u8) | stream id (u32) | payload length (u32) | payload
#
# Stream 0 is the connection itself; streams 1, 2, ... are consumer connections,
# numbered by the server in increasing order and never reused on one connection.
# The pod's first frame is HELLO; the server answers WELCOME or REJECT. After
# that each side may send the frames listed in POD_SENDS / SERVER_SENDS.
# Flow control is per stream and per direction, as in SSH channels: a side may
# have at most STREAM_WINDOW_BYTES of DATA unacknowledged; the receiver returns
# credit with WINDOW frames once it has handed the bytes to the local socket.

PROTOCOL_VERSION = 1
FRAME_HEADER = struct.Struct("!BII")
MAX_FRAME_BYTES = 256 * 1024          # largest payload a peer may send
STREAM_WINDOW_BYTES = 4 * 1024 * 1024  # per stream and direction: 100 MB/s at 40 ms
HELLO_TIMEOUT_S = 10                  # the first frame must arrive within this
HEARTBEAT_INTERVAL_S = 10             # PING when idle; silent for 3x = dead


class Msg(enum.IntEnum):
    """Frame types. Payloads: JSON objects for control frames on stream 0."""
    HELLO = 1    # pod: {"kind": "control", "version", "tunnel"} — first frame
    WELCOME = 2  # server: {"tunnel", "fqdn", "services", "heartbeat_interval_s"}
    REJECT = 3   # server: {"reason", "permanent"}; the connection then closes
    OPEN = 4     # server: a consumer arrived; payload u16 public port
    DATA = 5     # both: stream bytes, at most the peer's remaining credit
    WINDOW = 6   # both: payload u32 credit returned for this stream
    EOF = 7      # both: the sender will send no more DATA on this stream
    RESET = 8    # both: the stream is aborted; payload utf-8 reason
    PING = 9     # both: payload echoed back in PONG
    PONG = 10    # both
    GOAWAY = 11  # both: {"reason"}; no new streams, running ones may finish


POD_SENDS = frozenset({Msg.HELLO, Msg.DATA, Msg.WINDOW, Msg.EOF, Msg.RESET,
                       Msg.PING, Msg.PONG, Msg.GOAWAY})
SERVER_SENDS = frozenset({Msg.WELCOME, Msg.REJECT, Msg.OPEN, Msg.DATA,
                          Msg.WINDOW, Msg.EOF, Msg.RESET, Msg.PING, Msg.PONG,
                          Msg.GOAWAY})
U16 = struct.Struct("!H")
U32 = struct.Struct("!I")


class ProtocolError(Rejected):
    """The peer broke the wire contract; the connection is closed with this reason."""


def encode_frame(msg, stream, payload=b""):
    """Return the bytes of one frame. Payload must not exceed MAX_FRAME_BYTES."""
    return FRAME_HEADER.pack(msg, stream, len(payload)) + payload


def encode_control(msg, obj):
    """Return a stream-0 frame whose payload is the JSON encoding of obj."""
    return encode_frame(msg, 0, json.dumps(obj, separators=(",", ":")).encode())


def decode_control(payload):
    """Return the JSON object of a control frame, or raise ProtocolError."""
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("control frame is not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control frame is not a JSON object")
    return obj


class FrameDecoder:
    """Splits a byte stream into frames.

    frames(data) yields (msg, stream, payload) for what `data` completes.
    DATA payloads are passed on as they arrive (cut-through), possibly in
    several pieces, as memoryviews valid only until the next call; other
    frames come whole, as bytes. It buffers at most one control frame, raises
    ProtocolError for an unknown type or an oversized frame and never raises
    anything else."""

    def __init__(self, allowed):
        self.allowed = allowed
        self.buffer = bytearray()   # the header or control frame being assembled
        self.header = None          # (msg, stream, length) once a header is whole
        self.data_stream = 0        # DATA payload in progress: its stream ...
        self.data_left = 0          # ... and how much of it is still to come

    def frames(self, data):
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self.data_left:
                piece = view[pos:pos + self.data_left]
                self.data_left -= len(piece)
                pos += len(piece)
                yield Msg.DATA, self.data_stream, piece
                continue
            want = FRAME_HEADER.size + (self.header[2] if self.header else 0)
            take = min(want - len(self.buffer), end - pos)
            self.buffer += view[pos:pos + take]
            pos += take
            if len(self.buffer) < want:
                return
            if self.header is None:
                frame = self.start_frame()
                if frame is not None:
                    yield frame
            else:
                yield self.finish_frame()

    def start_frame(self):
        """A header is whole: check it; DATA switches to cut-through."""
        msg, stream, length = FRAME_HEADER.unpack_from(self.buffer)
        if msg not in self.allowed:
            raise ProtocolError("unexpected frame type %d" % msg)
        if length > MAX_FRAME_BYTES:
            raise ProtocolError("frame of %d bytes exceeds the limit" % length)
        if msg == Msg.DATA and length:
            del self.buffer[:]
            self.data_stream, self.data_left = stream, length
            return None
        self.header = (msg, stream, length)
        return self.finish_frame() if not length else None

    def finish_frame(self):
        msg, stream, _length = self.header
        payload = bytes(self.buffer[FRAME_HEADER.size:])
        del self.buffer[:]
        self.header = None
        return Msg(msg), stream, payload


def read_frame_blocking(sock, allowed, deadline):
    """Read exactly one whole frame from a blocking socket (the greeting), so
    nothing after it is consumed. ProtocolError on EOF, bad frames or after
    `deadline` (time.monotonic())."""
    header = recv_exactly(sock, FRAME_HEADER.size, deadline)
    msg, stream, length = FRAME_HEADER.unpack(header)
    if msg not in allowed or length > MAX_FRAME_BYTES:
        raise ProtocolError("bad first frame (type %d, %d bytes)" % (msg, length))
    return Msg(msg), stream, recv_exactly(sock, length, deadline)


def recv_exactly(sock, size, deadline):
    data = bytearray()
    while len(data) < size:
        if time.monotonic() > deadline:
            raise ProtocolError("greeting not complete within %d s" % HELLO_TIMEOUT_S)
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ProtocolError("connection closed during the greeting")
        data += chunk
    return bytes(data)
# ---- END SHARED protocol ----
# ---- BEGIN SHARED relay (identical in pipe2me_server.py and pipe2me_pod.py) ----
# One thread, one selector. A Mux owns one tunnel connection (TLS, non-blocking)
# and the Streams carried over it; each Stream pairs a local TCP socket (the
# consumer on the server, the service on the pod) with a stream id.
#
# Backpressure: a Stream reads its socket only while it has credit from the
# peer and the Mux's send buffer is below MUX_HIGH_WATER_BYTES; bytes from the
# peer wait in the Stream's buffer, which the peer's window bounds. So memory
# per stream never exceeds STREAM_WINDOW_BYTES, and a consumer that stops
# reading stalls only its own stream.
#
# Half-close: local EOF -> EOF frame; EOF frame -> drain, then shutdown(SHUT_WR).
# A Stream is finished when both directions are closed; RESET aborts it.

READ_CHUNK_BYTES = 256 * 1024          # one local read becomes one DATA frame
TLS_READ_BYTES = 256 * 1024            # decoded per batch; a TLS read returns one 16 KiB record
WRITE_CHUNK_BYTES = FRAME_HEADER.size + READ_CHUNK_BYTES  # >= any direct write, for TLS retries
MUX_HIGH_WATER_BYTES = 1024 * 1024
MUX_LOW_WATER_BYTES = 256 * 1024
WINDOW_UPDATE_BYTES = STREAM_WINDOW_BYTES // 4
EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE
SOCKET_GONE = (ConnectionError, TimeoutError, OSError)


def raise_open_file_limit():
    """Let the relay hold as many sockets as allowed: soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class EventLoop:
    """A selectors loop with timers and a thread-safe call_soon.

    Callbacks must not block. watch() registers, changes or (events=0)
    unregisters a socket; the callback receives the event mask."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.timers = []
        self.timer_seq = 0
        self.soon = collections.deque()
        self.waker_r, self.waker_w = socket.socketpair()
        self.waker_r.setblocking(False)
        self.waker_w.setblocking(False)
        self.watch(self.waker_r, EVENT_READ, self.on_wake)
        self.running = False

    def watch(self, sock, events, callback=None):
        try:
            key = self.selector.get_key(sock)
        except (KeyError, ValueError):
            key = None
        if key is None:
            if events:
                self.selector.register(sock, events, callback)
        elif not events:
            self.selector.unregister(sock)
        elif key.events != events or (callback and key.data is not callback):
            self.selector.modify(sock, events, callback or key.data)

    def call_later(self, delay_s, callback):
        """Run callback after delay_s; returns a handle whose cancel() stops it."""
        handle = Timer(time.monotonic() + delay_s, callback)
        self.timer_seq += 1
        heapq.heappush(self.timers, (handle.when, self.timer_seq, handle))
        return handle

    def call_soon_threadsafe(self, callback):
        self.soon.append(callback)
        try:
            self.waker_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending

    def on_wake(self, _mask):
        try:
            self.waker_r.recv(4096)
        except (BlockingIOError, OSError):
            pass

    def run(self):
        """Serve until stop(); exceptions from callbacks propagate (they are bugs)."""
        self.running = True
        while self.running:
            self.run_once()

    def run_once(self):
        timeout = None
        if self.soon:
            timeout = 0
        elif self.timers:
            timeout = max(0.0, self.timers[0][0] - time.monotonic())
        for key, mask in self.selector.select(timeout):
            key.data(mask)
        while self.soon:
            self.soon.popleft()()
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            handle = heapq.heappop(self.timers)[2]
            if not handle.cancelled:
                handle.callback()

    def stop(self):
        self.running = False
        self.call_soon_threadsafe(lambda: None)


class Timer:
    """Handle of a call_later() callback."""

    def __init__(self, when, callback):
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self):
        self.cancelled = True


class Stream:
    """One consumer connection carried over a Mux.

    Promises: the socket is read only with credit and an uncongested Mux; at
    most STREAM_WINDOW_BYTES wait in `pending`; destroy() is idempotent and
    closes the socket and forgets the stream."""

    def __init__(self, mux, stream_id, sock, connecting=False):
        self.mux, self.id, self.sock = mux, stream_id, sock
        self.connecting = connecting
        self.credit = STREAM_WINDOW_BYTES      # what we may still send
        self.unacked = 0                       # received, not yet credited back
        self.delivered = 0                     # written locally since last WINDOW
        self.pending = collections.deque()     # bytes from the peer to write
        self.pending_bytes = 0
        self.read_closed = False               # local EOF seen, EOF frame sent
        self.peer_eof = False                  # EOF frame received
        self.write_closed = False              # SHUT_WR done on the socket
        self.last_active = time.monotonic()
        self.paused = False                    # reading held back by a rate cap
        self.closed = False
        self.update_interest()

    def update_interest(self):
        if self.closed:
            return
        events = 0
        if self.connecting or self.pending:
            events |= EVENT_WRITE
        if (not self.connecting and not self.read_closed and self.credit > 0
                and not self.mux.congested and not self.paused):
            events |= EVENT_READ
        self.mux.loop.watch(self.sock, events, self.on_event)

    def pause_reading(self, seconds):
        self.paused = True
        self.update_interest()
        self.mux.loop.call_later(seconds, self.resume_reading)

    def resume_reading(self):
        self.paused = False
        self.update_interest()

    def on_event(self, mask):
        if mask & EVENT_WRITE:
            self.on_writable()
        if mask & EVENT_READ and not self.closed:
            self.on_readable()

    def on_readable(self):
        mux = self.mux
        if mux.congested:
            mux.blocked.add(self)
            return self.update_interest()
        limit = FRAME_HEADER.size + min(self.credit, READ_CHUNK_BYTES)
        try:  # straight into the shared frame buffer, behind room for the header
            size = self.sock.recv_into(mux.scratch_view[FRAME_HEADER.size:limit])
        except (BlockingIOError, InterruptedError):
            return
        except SOCKET_GONE as exc:
            return self.abort("local read failed: %s" % exc)
        self.last_active = time.monotonic()
        if not size:
            self.read_closed = True
            mux.send(Msg.EOF, self.id)
            return self.finish_if_done()
        self.credit -= size
        mux.local_read_bytes += size
        FRAME_HEADER.pack_into(mux.scratch, 0, Msg.DATA, self.id, size)
        mux.send_view(mux.scratch_view[:FRAME_HEADER.size + size])
        pause = mux.pace(size) if mux.pace else 0
        if pause > 0:
            self.pause_reading(pause)
        elif not self.credit:
            self.update_interest()

    def on_writable(self):
        if self.connecting:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.mux.log.warning("local service unavailable stream=%d error=%s",
                                     self.id, os.strerror(err))
                return self.abort("local connect failed: %s" % os.strerror(err))
            self.connecting = False
        self.flush_pending()
        if not self.closed:
            self.update_interest()

    def on_data(self, payload):
        """A piece of DATA (a view valid only now): write it, or keep a copy."""
        self.unacked += len(payload)
        if self.unacked > STREAM_WINDOW_BYTES:
            raise ProtocolError("stream %d: data beyond the window" % self.id)
        if self.peer_eof:
            raise ProtocolError("stream %d: data after EOF" % self.id)
        self.last_active = time.monotonic()
        if self.pending or self.connecting:
            self.keep(payload)
            return
        try:
            sent = self.sock.send(payload)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except SOCKET_GONE as exc:
            return self.abort("local write failed: %s" % exc)
        self.count_delivered(sent)
        if sent < len(payload):
            self.keep(payload[sent:])

    def keep(self, payload):
        was_empty = not self.pending
        self.pending.append(bytes(payload))
        self.pending_bytes += len(payload)
        if was_empty:
            self.update_interest()

    def count_delivered(self, sent):
        """Bytes reached the local socket: count them, return credit in batches."""
        self.delivered += sent
        self.mux.local_written_bytes += sent
        if self.delivered >= WINDOW_UPDATE_BYTES:
            self.mux.send(Msg.WINDOW, self.id, U32.pack(self.delivered))
            self.unacked -= self.delivered
            self.delivered = 0

    def flush_pending(self):
        """Write what the peer sent; return credit; half-close after its EOF."""
        while self.pending:
            chunk = self.pending[0]
            try:
                sent = self.sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                break
            except SOCKET_GONE as exc:
                return self.abort("local write failed: %s" % exc)
            self.pending_bytes -= sent
            self.count_delivered(sent)
            if sent < len(chunk):
                self.pending[0] = chunk[sent:]
                break
            self.pending.popleft()
        if self.peer_eof and not self.pending and not self.write_closed:
            self.shutdown_write()

    def shutdown_write(self):
        self.write_closed = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except SOCKET_GONE:
            pass
        self.finish_if_done()

    def on_window(self, payload):
        if len(payload) != U32.size:
            raise ProtocolError("stream %d: bad WINDOW frame" % self.id)
        was_blocked = self.credit <= 0
        self.credit += U32.unpack(payload)[0]
        if self.credit > STREAM_WINDOW_BYTES:
            raise ProtocolError("stream %d: window grew past its size" % self.id)
        if was_blocked:
            self.update_interest()

    def on_eof(self):
        self.peer_eof = True
        if not self.connecting and not self.pending:
            self.shutdown_write()

    def finish_if_done(self):
        if self.read_closed and self.write_closed:
            self.destroy()
        else:
            self.update_interest()

    def abort(self, reason):
        """Close the stream now and tell the peer why."""
        if not self.closed:
            self.mux.send(Msg.RESET, self.id, reason.encode()[:512])
            self.mux.log.debug("stream reset stream=%d reason=%r", self.id, reason)
            self.destroy()

    def destroy(self):
        if self.closed:
            return
        self.closed = True
        self.mux.loop.watch(self.sock, 0)
        self.sock.close()
        self.mux.streams.pop(self.id, None)
        self.mux.blocked.discard(self)
        self.mux.on_stream_closed(self)


class Mux:
    """The multiplexed tunnel connection on either side.

    `receives` is the set of frame types the peer may send. Owners override
    on_open() (pod), on_control() (stream-0 frames) and on_closed(). destroy()
    is idempotent: it closes every stream and the connection, then calls
    on_closed(reason) once."""

    def __init__(self, loop, sock, receives, log, heartbeat_s=HEARTBEAT_INTERVAL_S):
        self.loop, self.sock, self.log = loop, sock, log
        self.decoder = FrameDecoder(receives)
        self.streams = {}
        self.blocked = set()
        self.highest_stream = 0
        self.out = bytearray()
        self.congested = False
        self.closed = False
        self.local_read_bytes = 0      # read from local sockets, sent as DATA
        self.local_written_bytes = 0   # received as DATA, written locally
        self.heartbeat_s = heartbeat_s
        self.last_heard = time.monotonic()
        self.heartbeat = loop.call_later(heartbeat_s, self.on_heartbeat)
        self.pace = None      # owner's rate cap: callable(bytes moved) -> seconds to pause
        self.reading_paused = False
        self.scratch = bytearray(WRITE_CHUNK_BYTES)   # outgoing DATA, built in place
        self.scratch_view = memoryview(self.scratch)
        self.inbox = bytearray(TLS_READ_BYTES)        # incoming bytes, decoded in place
        self.inbox_view = memoryview(self.inbox)
        sock.setblocking(False)
        loop.watch(sock, EVENT_READ, self.on_event)
        loop.call_later(0, self.on_readable)  # TLS may hold bytes read during the greeting

    # -- sending -------------------------------------------------------
    def send(self, msg, stream, payload=b""):
        if self.closed:
            return
        self.out += FRAME_HEADER.pack(msg, stream, len(payload))
        self.out += payload
        if len(self.out) > MUX_HIGH_WATER_BYTES:
            self.congested = True
        self.flush()

    def send_view(self, view):
        """Send a whole frame from a view; only what the socket refuses is copied."""
        if self.closed:
            return
        if self.out:
            self.out += view
            if len(self.out) > MUX_HIGH_WATER_BYTES:
                self.congested = True
            return self.flush()
        try:
            sent = self.sock.send(view)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            sent = 0
        except SOCKET_GONE as exc:
            return self.destroy("send failed: %s" % exc)
        if sent < len(view):
            self.out += view[sent:]
            reading = 0 if self.reading_paused else EVENT_READ
            self.loop.watch(self.sock, reading | EVENT_WRITE, self.on_event)

    def send_control(self, msg, obj):
        self.send(msg, 0, json.dumps(obj, separators=(",", ":")).encode())

    def flush(self):
        while self.out and not self.closed:
            try:
                with memoryview(self.out) as view:
                    sent = self.sock.send(view[:WRITE_CHUNK_BYTES])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                break
            except SOCKET_GONE as exc:
                return self.destroy("send failed: %s" % exc)
            del self.out[:sent]
        if self.closed:
            return
        if self.congested and len(self.out) <= MUX_LOW_WATER_BYTES:
            self.congested = False
            for stream in list(self.blocked):
                stream.update_interest()
            self.blocked.clear()
        events = (0 if self.reading_paused else EVENT_READ) | (EVENT_WRITE if self.out else 0)
        self.loop.watch(self.sock, events, self.on_event)

    # -- receiving -----------------------------------------------------
    def on_event(self, mask):
        if mask & EVENT_WRITE:
            self.flush()
        if mask & EVENT_READ and not self.closed and not self.reading_paused:
            self.on_readable()

    def on_readable(self):
        if self.closed:
            return
        for _ in range(16):
            size, eof = self.read_batch()
            if size:
                self.last_heard = time.monotonic()
            try:
                for msg, stream, payload in self.decoder.frames(self.inbox_view[:size]):
                    self.dispatch(msg, stream, payload)
                    if self.closed:
                        return
            except ProtocolError as exc:
                return self.fail(str(exc))
            if eof:
                return self.destroy(eof)
            pause = self.pace(size) if self.pace and size else 0
            if pause > 0:
                return self.pause_reading(pause)
            if size < len(self.inbox):
                return
        pending = getattr(self.sock, "pending", None)
        if not self.closed and pending and pending():
            self.loop.call_later(0, lambda: self.closed or self.on_readable())

    def pause_reading(self, seconds):
        """A rate cap: stop reading the peer for a while (writes go on)."""
        self.reading_paused = True
        self.loop.watch(self.sock, EVENT_WRITE if self.out else 0, self.on_event)
        self.loop.call_later(seconds, self.resume_reading)

    def resume_reading(self):
        self.reading_paused = False
        if not self.closed:
            self.flush()
            self.on_readable()

    def read_batch(self):
        """Fill the inbox with what has arrived (a TLS read returns one record,
        so many reads make one batch and few local writes); (size, eof reason)."""
        view, size = self.inbox_view, 0
        while size < len(view):
            try:
                got = self.sock.recv_into(view[size:])
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return size, None
            except SOCKET_GONE as exc:
                return size, "receive failed: %s" % exc
            if not got:
                return size, "connection closed by peer"
            size += got
        return size, None

    def dispatch(self, msg, stream_id, payload):
        if stream_id == 0:
            return self.on_frame_0(msg, payload)
        if msg == Msg.OPEN:
            return self.on_open_frame(stream_id, payload)
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.highest_stream:
                raise ProtocolError("frame for unknown stream %d" % stream_id)
            return  # frames in flight for a stream closed here are expected
        if msg == Msg.DATA:
            stream.on_data(payload)
        elif msg == Msg.WINDOW:
            stream.on_window(payload)
        elif msg == Msg.EOF:
            stream.on_eof()
        elif msg == Msg.RESET:
            stream.destroy()
        else:
            raise ProtocolError("%s is not a stream frame" % msg.name)

    def on_frame_0(self, msg, payload):
        if msg == Msg.PING:
            self.send(Msg.PONG, 0, payload)
        elif msg == Msg.PONG:
            pass  # any frame counts as a sign of life
        else:
            self.on_control(msg, decode_control(payload))

    def on_open_frame(self, stream_id, payload):
        if stream_id <= self.highest_stream or len(payload) != U16.size:
            raise ProtocolError("bad OPEN for stream %d" % stream_id)
        self.highest_stream = stream_id
        self.on_open(stream_id, U16.unpack(payload)[0])

    # -- streams -------------------------------------------------------
    def open_stream(self, sock, port):
        """Server side: carry a new consumer socket to the pod's `port` service."""
        self.highest_stream += 1
        self.send(Msg.OPEN, self.highest_stream, U16.pack(port))
        return self.add_stream(self.highest_stream, sock)

    def add_stream(self, stream_id, sock, connecting=False):
        sock.setblocking(False)
        stream = Stream(self, stream_id, sock, connecting)
        self.streams[stream_id] = stream
        return stream

    # -- liveness and teardown -----------------------------------------
    def on_heartbeat(self):
        """PING every interval; declare the peer dead the moment it has been
        silent for three intervals (the next check is timed for that)."""
        if self.closed:
            return
        silent = time.monotonic() - self.last_heard
        if silent >= 3 * self.heartbeat_s:
            return self.destroy("peer silent for %.1f s" % silent)
        self.send(Msg.PING, 0, U32.pack(int(silent)))
        next_check = min(self.heartbeat_s, 3 * self.heartbeat_s - silent)
        self.heartbeat = self.loop.call_later(max(next_check, 0.01), self.on_heartbeat)

    def fail(self, reason):
        """The peer broke the protocol: say why, then close."""
        self.log.warning("protocol error: %s", reason)
        self.send(Msg.GOAWAY, 0, json.dumps({"reason": reason}).encode())
        self.destroy("protocol error: %s" % reason)

    def destroy(self, reason):
        if self.closed:
            return
        self.closed = True
        self.heartbeat.cancel()
        for stream in list(self.streams.values()):
            stream.destroy()
        self.loop.watch(self.sock, 0)
        try:
            self.sock.close()
        except OSError:
            pass
        self.on_closed(reason)

    # -- for owners to override ----------------------------------------
    def on_open(self, stream_id, port):
        raise ProtocolError("OPEN is not expected here")

    def on_control(self, msg, obj):
        raise ProtocolError("unexpected %s" % msg.name)

    def on_stream_closed(self, stream):
        pass

    def on_closed(self, reason):
        pass
# ---- END SHARED relay ----

# =====================================================================
# TOKENS — tokens.conf in the original format; read by the store and the CLI
# =====================================================================

TOKEN_OPTIONS = {
    # option: (default, parser)
    "max_ports": (1, lambda v: max(1, int(v))),
    "lifespan": (30 * 86400, parse_positive_duration),
    "extend": (False, lambda v: parse_bool(v)),
    "unique": (False, lambda v: parse_bool(v)),
    "max_traffic": (0, lambda v: parse_bytes(v)),
    "rate": (0, lambda v: parse_bytes(v)),
}
TOKEN_NAME = re.compile(r"[^\s=#]{4,200}")


def parse_bool(value):
    if value.lower() in ("true", "yes", "1", "on"):
        return True
    if value.lower() in ("false", "no", "0", "off"):
        return False
    raise ValueError("not a boolean: %r" % value)


def parse_bytes(value):
    match = re.fullmatch(r"(\d+)([KMG]?)", value.strip().upper())
    if not match:
        raise ValueError("not a byte count: %r" % value)
    return int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)]


def parse_token_line(line):
    """`name = option:value ...` -> (name, options); raises ValueError."""
    name, sep, rest = line.partition("=")
    name = name.strip()
    if not sep or not TOKEN_NAME.fullmatch(name):
        raise ValueError("expected 'name = option:value ...' with a name of 4+ characters")
    options = {key: default for key, (default, _) in TOKEN_OPTIONS.items()}
    for item in rest.split():
        key, colon, value = item.partition(":")
        if key not in TOKEN_OPTIONS or not colon:
            raise ValueError("unknown option %r (known: %s)" % (item, ", ".join(TOKEN_OPTIONS)))
        options[key] = TOKEN_OPTIONS[key][1](value)
    return name, options


def format_token_line(name, options):
    shown = " ".join("%s:%s" % (k, str(v).lower() if isinstance(v, bool) else v)
                     for k, v in options.items())
    return "%s = %s" % (name, shown)


def load_tokens(path):
    """Return {name: options}; a bad line is logged with file:line and skipped."""
    tokens = {}
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return tokens
    except (OSError, UnicodeDecodeError) as exc:
        log.error("cannot read tokens file=%s error=%s", path, exc)
        return tokens
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip() if line.lstrip().startswith("#") else line.strip()
        if not line:
            continue
        try:
            name, options = parse_token_line(line)
        except ValueError as exc:
            log.warning("bad token line skipped at %s:%d: %s", path, number, exc)
            continue
        tokens[name] = options
    return tokens


def new_token_name():
    return "p2m-" + secrets.token_urlsafe(18)


# =====================================================================
# STATE STORE — owns STATE_DIR/tunnels/*.json and the port pool; used by the
# API, the sessions and the admin CLI. All methods are thread-safe.
# =====================================================================

STATE_VERSION = 1
TUNNEL_ID = re.compile(r"[0-9a-f]{16}")


class Store:
    """Tunnel records, one JSON file each, written atomically.

    A port or a name belongs to a tunnel while its file exists and it has not
    passed expires_at + PORT_GRACE, so after any crash the port pool is simply
    what the files say. Callers get copies, never the live dicts."""

    def __init__(self, settings):
        self.settings = settings
        self.lock = threading.RLock()
        self.tunnels = {}
        self.used_tokens = set()
        self.on_change = lambda tunnel_id: None
        self.used_path = os.path.join(settings.state_dir, "used_tokens.json")

    def load(self):
        """Read every tunnel file; unreadable ones are logged and left alone.

        Holds the lock while reading: a tunnel created between the listing and
        the swap (SIGHUP during API traffic) would be forgotten, its ports reused."""
        os.makedirs(self.settings.tunnel_dir, mode=0o700, exist_ok=True)
        with self.lock:
            tunnels = {}
            for name in sorted(os.listdir(self.settings.tunnel_dir)):
                if not (name.endswith(".json") and TUNNEL_ID.fullmatch(name[:-5])):
                    continue
                try:
                    record = read_json(os.path.join(self.settings.tunnel_dir, name))
                except (OSError, ValueError) as exc:
                    log.error("unreadable tunnel file=%s error=%s", name, exc)
                    continue
                tunnels[record["id"]] = record
            used = set()
            if os.path.exists(self.used_path):
                used = set(read_json(self.used_path).get("used", []))
            self.tunnels, self.used_tokens = tunnels, used
        return len(tunnels)

    # -- queries -----------------------------------------------------
    def get(self, tunnel_id):
        with self.lock:
            record = self.tunnels.get(tunnel_id)
            return json.loads(json.dumps(record)) if record else None

    def all(self):
        with self.lock:
            return [json.loads(json.dumps(r)) for r in self.tunnels.values()]

    def by_fqdn(self, fqdn):
        with self.lock:
            for record in self.tunnels.values():
                if record["fqdn"] == fqdn:
                    return dict(record)
        return None

    def by_cert(self, fingerprint):
        with self.lock:
            for record in self.tunnels.values():
                if fingerprint in record.get("cert_sha256", []):
                    return dict(record)
        return None

    def holds_resources(self, record, now):
        return now < record["expires_at"] + self.settings.port_grace

    def taken_ports(self, now):
        return {p for r in self.tunnels.values() if self.holds_resources(r, now)
                for p in r["ports"]}

    def live_count_for_token(self, token_hash, now):
        return sum(1 for r in self.tunnels.values()
                   if r.get("token_sha256") == token_hash and now < r["expires_at"])

    # -- changes -----------------------------------------------------
    def save(self, record):
        path = os.path.join(self.settings.tunnel_dir, record["id"] + ".json")
        write_json(path, record, mode=0o600)

    def create(self, token_name, options, protocols, now=None):
        """Reserve a name and ports and write the record; returns (record, secret)."""
        now = int(now or time.time())
        token_hash = sha256_hex(token_name)
        with self.lock:
            self.check_token_use(token_hash, options, now)
            ports = self.free_ports(len(protocols), now)
            secret = secrets.token_urlsafe(24)
            record = {
                "version": STATE_VERSION, "id": self.new_id(),
                "fqdn": self.new_fqdn(now), "protocols": list(protocols),
                "ports": ports, "token_sha256": token_hash,
                "secret_sha256": sha256_hex(secret), "created_at": now,
                "expires_at": now + options["lifespan"], "cert_sha256": [],
                "bytes_in": 0, "bytes_out": 0,
                "max_traffic": options["max_traffic"], "rate": options["rate"],
            }
            if options["unique"]:
                self.mark_token_used(token_hash)
            self.save(record)
            self.tunnels[record["id"]] = record
        self.on_change(record["id"])
        return dict(record), secret

    def check_token_use(self, token_hash, options, now):
        if options["unique"] and token_hash in self.used_tokens:
            raise Rejected("this token was for one use and has been used")
        cap = self.settings.max_tunnels_per_token
        if cap and self.live_count_for_token(token_hash, now) >= cap:
            raise Rejected("this token already has %d live tunnels (MAX_TUNNELS_PER_TOKEN)" % cap)

    def mark_token_used(self, token_hash):
        used = self.used_tokens | {token_hash}
        write_json(self.used_path, {"version": STATE_VERSION, "used": sorted(used)}, 0o600)
        self.used_tokens = used

    def free_ports(self, count, now):
        taken = self.taken_ports(now)
        free = [p for p in self.settings.tunnel_ports if p not in taken]
        if len(free) < count:
            raise Unavailable("no free public ports left in TUNNEL_PORTS")
        return free[:count]

    def new_id(self):
        while True:
            candidate = secrets.token_hex(8)
            if candidate not in self.tunnels:
                return candidate

    def new_fqdn(self, now):
        taken = {r["fqdn"] for r in self.tunnels.values() if self.holds_resources(r, now)}
        domain = self.settings.tunnel_domain
        for attempt in range(200):
            words = three_words()
            name = "%s.%s" % (words if attempt < 20 else "%s-%d" % (words, attempt), domain)
            if name not in taken:
                return name
        raise Unavailable("could not find a free name")

    def update(self, tunnel_id, **changes):
        """Apply changes to a record and save it; returns the new copy or None."""
        with self.lock:
            record = self.tunnels.get(tunnel_id)
            if record is None:
                return None
            updated = dict(record, **changes)
            self.save(updated)
            self.tunnels[tunnel_id] = updated
        self.on_change(tunnel_id)
        return dict(updated)

    def add_traffic(self, tunnel_id, bytes_in, bytes_out):
        with self.lock:
            record = self.tunnels.get(tunnel_id)
            if record is None or not (bytes_in or bytes_out):
                return
            record["bytes_in"] += bytes_in
            record["bytes_out"] += bytes_out
            self.save(record)

    def delete(self, tunnel_id):
        with self.lock:
            if self.tunnels.pop(tunnel_id, None) is None:
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.settings.tunnel_dir, tunnel_id + ".json"))
                fsync_dir(self.settings.tunnel_dir)
        self.on_change(tunnel_id)
        return True

    def purge_stale(self, now):
        """Forget tunnels past their grace period; returns their ids."""
        with self.lock:
            stale = [i for i, r in self.tunnels.items() if not self.holds_resources(r, now)]
        for tunnel_id in stale:
            self.delete(tunnel_id)
        return stale


def tunnel_status(record, now=None):
    return "online" if (now or time.time()) < record["expires_at"] else "expired"


def public_view(record, settings, now=None):
    """What the API shows of a tunnel (never a secret or a hash)."""
    urls = ["%s://%s:%d" % (proto, record["fqdn"], port)
            for proto, port in zip(record["protocols"], record["ports"])]
    return {
        "id": record["id"], "fqdn": record["fqdn"], "protocols": record["protocols"],
        "ports": record["ports"], "urls": urls, "status": tunnel_status(record, now),
        "created_at": record["created_at"], "expires_at": record["expires_at"],
        "tunnel_port": settings.tunnel_port, "tunnel_domain": settings.tunnel_domain,
        "bytes_in": record["bytes_in"], "bytes_out": record["bytes_out"],
    }

# =====================================================================
# CERTIFICATES — owns STATE_DIR/ca (CA key and cert, issued/); used by the
# API (POST /tunnels/<id>/cert, GET /cacert) and the wiring (the TLS
# certificate of HTTPS_PORT and TUNNEL_PORT)
# =====================================================================

OPENSSL_TIMEOUT_S = 30
CSR_MAX_BYTES = 64 * 1024
CA_VALIDITY_DAYS = 3650
LEAF_BACKDATE_S = 300            # tolerate pods whose clocks run a little slow
SERVER_CERT_RENEW_BEFORE_S = 7 * 86400
RSA_MIN_BITS = 2048
RSA_MAX_BITS = 16384             # OpenSSL's own ceiling for RSA verification
OID_MAX_BYTES = 64
FQDN_MAX_CHARS = 253

OID_COMMON_NAME = "2.5.4.3"
OID_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"
OID_SUBJECT_ALT_NAME = "2.5.29.17"
OID_BASIC_CONSTRAINTS = "2.5.29.19"
OID_RSA = "1.2.840.113549.1.1.1"
OID_EC = "1.2.840.10045.2.1"
OID_ED25519 = "1.3.101.112"
OID_P256 = "1.2.840.10045.3.1.7"
OID_P384 = "1.3.132.0.34"
EC_CURVE_BITS = {OID_P256: 256, OID_P384: 384, "1.3.132.0.35": 521}
ACCEPTED_EC_CURVES = (OID_P256, OID_P384)

# OpenSSL 3.0 `req -verify` exits 0 even when the signature is bad, so the
# status line is the only signal; anything else counts as a failure.
VERIFY_OK_LINES = ("Certificate request self-signature verify OK", "verify OK")

TAG_BOOLEAN, TAG_INTEGER, TAG_BIT_STRING, TAG_OCTET_STRING = 0x01, 0x02, 0x03, 0x04
TAG_OID, TAG_UTC_TIME, TAG_GENERALIZED_TIME = 0x06, 0x17, 0x18
TAG_SEQUENCE, TAG_SET, TAG_CONTEXT_0 = 0x30, 0x31, 0xA0
TAG_SAN_DNS = 0x82
SAN_KIND_BY_TAG = {0xA0: "otherName", 0x81: "email", 0xA3: "x400Address", 0xA4: "dirName",
                   0xA5: "ediPartyName", 0x86: "URI", 0x87: "IP", 0x88: "registeredID"}
STRING_CODEC_BY_TAG = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x1A: "ascii",
                       0x14: "latin-1", 0x1E: "utf-16-be", 0x1C: "utf-32-be"}

_LDH_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_FQDN_RE = re.compile(_LDH_LABEL + r"(?:\." + _LDH_LABEL + r")*")
_PEM_RE = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----([A-Za-z0-9+/=\s]*)-----END \1-----")
CSR_PEM_LABELS = ("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")

DerItem = Tuple[int, int, int]   # (tag, content_start, content_end)


class OpensslFailed(Unavailable):
    """openssl ran and exited non-zero; the message carries its last stderr line."""


# ---- openssl ----------------------------------------------------------

def run_openssl(args: Sequence[str], input_bytes: Optional[bytes] = None,
                cwd: Optional[str] = None, merge_stderr: bool = False) -> bytes:
    """Run `openssl *args` (argv, no shell) and return its stdout.

    The only place the server executes openssl.  stdin is `input_bytes` or
    empty (so a passphrase prompt can never hang us); merge_stderr=True returns
    stderr interleaved with stdout for the few commands that report only there.
    Raises Unavailable if openssl is missing or exceeds OPENSSL_TIMEOUT_S, and
    OpensslFailed (an Unavailable) with the last stderr line on a non-zero exit.
    """
    argv = ["openssl"] + [str(arg) for arg in args]
    stdin = {"input": input_bytes} if input_bytes is not None else {"stdin": subprocess.DEVNULL}
    try:
        done = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, timeout=OPENSSL_TIMEOUT_S,
                              stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                              check=False, **stdin)
    except FileNotFoundError as exc:
        if exc.filename == "openssl":
            raise Unavailable("the openssl command was not found: install the Debian package "
                              "'openssl' (apt-get install openssl)") from None
        raise Unavailable("cannot run openssl %s: %s" % (argv[1], exc)) from None
    except subprocess.TimeoutExpired:
        raise Unavailable("openssl %s did not finish within %s s" % (argv[1], OPENSSL_TIMEOUT_S)) from None
    except OSError as exc:
        raise Unavailable("cannot run openssl %s: %s" % (argv[1], exc)) from None
    if done.returncode != 0:
        raise OpensslFailed("openssl %s failed (exit %d): %s"
                            % (argv[1], done.returncode, _last_line(done.stderr or done.stdout)))
    return done.stdout


def _last_line(output: bytes) -> str:
    """The last non-blank line of openssl's output, where it puts the actual error."""
    lines = [line.strip() for line in output.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:300] if lines else "no message"


# ---- names --------------------------------------------------------------

def valid_fqdn(name: str) -> bool:
    """True if name is dot-separated LDH labels (1-63 chars, no edge hyphen), 253 chars at most.

    Only such names may reach an openssl -subj or config string: no '/', ',',
    '=', spaces, quotes or newlines can pass, so nothing can be injected.
    """
    return isinstance(name, str) and len(name) <= FQDN_MAX_CHARS and _FQDN_RE.fullmatch(name) is not None


def _shown(value: str, limit: int = 80) -> str:
    """value made safe for a one-line reason: escaped and shortened."""
    text = ascii(value)[1:-1]
    return text if len(text) <= limit else text[:limit] + "..."


# ---- DER reading ----------------------------------------------------------

def der_read(data: bytes, pos: int, end: Optional[int] = None) -> DerItem:
    """Read the DER header at data[pos:end] and return (tag, content_start, content_end).

    content_end never exceeds end (default len(data)).  Raises CertRefused on
    truncation, indefinite or non-minimal lengths, lengths over 4 bytes and
    multi-byte tags: never IndexError or ValueError.
    """
    end = len(data) if end is None else min(end, len(data))
    if pos < 0 or pos + 2 > end:
        raise CertRefused("malformed DER: truncated element")
    tag, first = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise CertRefused("malformed DER: unsupported multi-byte tag")
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > end:
            raise CertRefused("malformed DER: bad length")
        length = int.from_bytes(data[pos:pos + count], "big")
        if data[pos] == 0 or length < 0x80:
            raise CertRefused("malformed DER: non-minimal length")
        pos += count
    if pos + length > end:
        raise CertRefused("malformed DER: element longer than its container")
    return tag, pos, pos + length


def der_items(data: bytes, start: int, end: int) -> List[DerItem]:
    """All elements that exactly fill data[start:end]; each is at least 2 bytes, so the loop is bounded."""
    items = []
    pos = start
    while pos < end:
        item = der_read(data, pos, end)
        items.append(item)
        pos = item[2]
    return items


def der_expect(item: DerItem, tag: int, what: str) -> Tuple[int, int]:
    """(content_start, content_end) of item, or CertRefused if its tag is not tag."""
    if item[0] != tag:
        raise CertRefused("malformed DER: %s has tag 0x%02x, expected 0x%02x" % (what, item[0], tag))
    return item[1], item[2]


def der_children(data: bytes, item: DerItem, tag: int, what: str,
                 least: int, most: int) -> List[DerItem]:
    """The elements inside item (which must carry tag), refusing fewer than least or more than most."""
    start, end = der_expect(item, tag, what)
    items = der_items(data, start, end)
    if not least <= len(items) <= most:
        raise CertRefused("malformed DER: %s has %d elements" % (what, len(items)))
    return items


def der_oid(data: bytes, item: DerItem, what: str) -> str:
    """The dotted form of an OBJECT IDENTIFIER element; refuses non-minimal or oversized arcs."""
    start, end = der_expect(item, TAG_OID, what)
    raw = data[start:end]
    if not raw or len(raw) > OID_MAX_BYTES or raw[-1] & 0x80:
        raise CertRefused("malformed DER: bad object identifier in %s" % what)
    arcs, value, fresh = [], 0, True
    for byte in raw:
        if fresh and byte == 0x80:
            raise CertRefused("malformed DER: non-minimal object identifier in %s" % what)
        value, fresh = (value << 7) | (byte & 0x7F), not byte & 0x80
        if fresh:
            arcs.append(value)
            value = 0
    top = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in [top, arcs[0] - 40 * top] + arcs[1:])


def der_string(data: bytes, item: DerItem, what: str) -> str:
    """The text of a DER string element (UTF8, Printable, IA5, BMP, ...)."""
    codec = STRING_CODEC_BY_TAG.get(item[0])
    if codec is None:
        raise CertRefused("malformed DER: %s is not a string" % what)
    try:
        return data[item[1]:item[2]].decode(codec)
    except UnicodeDecodeError:
        raise CertRefused("malformed DER: %s is not valid %s" % (what, codec)) from None


def der_bit_string(data: bytes, item: DerItem, what: str) -> Tuple[int, int]:
    """Bounds of a BIT STRING's payload; keys and signatures have no unused bits."""
    start, end = der_expect(item, TAG_BIT_STRING, what)
    if start == end or data[start] != 0:
        raise CertRefused("malformed DER: %s is not a whole number of bytes" % what)
    return start + 1, end


def pem_blocks(text: str, labels: Sequence[str]) -> List[bytes]:
    """DER of every PEM block in text whose label is one of labels, in order."""
    blocks = []
    for match in _PEM_RE.finditer(text):
        if match.group(1) in labels:
            try:
                blocks.append(base64.b64decode("".join(match.group(2).split()), validate=True))
            except (binascii.Error, ValueError):
                raise CertRefused("malformed PEM: bad base64 in %s" % match.group(1)) from None
    return blocks


def der_to_pem(der: bytes, label: str) -> str:
    """PEM text of der with 64-column lines, as openssl writes it."""
    body = base64.b64encode(der).decode("ascii")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, "\n".join(lines), label)


# ---- CSR inspection ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CsrFacts:
    """What a CSR asks for, read from its DER after its self-signature was verified.

    subject: (oid, value) pairs in order, multi-valued RDNs flattened.
    san_dns / san_other: subjectAltName entries; san_other names the kinds of
    non-DNS entries (e.g. "IP", "email").  Both empty if the CSR has no SAN.
    key_type: 'rsa', 'ec', 'ed25519' or 'other'; key_bits: RSA modulus bits or
    EC curve bits (0 if unknown); ec_curve: the curve OID for EC keys, else "".
    der: the exact CSR that was inspected, the one to hand to openssl.
    """

    subject: List[Tuple[str, str]]
    san_dns: List[str]
    san_other: List[str]
    ca_requested: bool
    key_type: str
    key_bits: int
    ec_curve: str
    key_oid: str
    der: bytes = dataclasses.field(repr=False)


def inspect_csr(pem_text: str) -> CsrFacts:
    """Read and verify one PEM CSR; raise CertRefused with a one-line reason if it is unusable.

    Refuses non-text or non-ASCII input, input over CSR_MAX_BYTES, anything
    but exactly one CERTIFICATE REQUEST block, malformed DER and a bad
    self-signature.  Says nothing about whether the CSR is acceptable for a
    tunnel: that is check_csr_for().  May raise Unavailable if openssl cannot run.
    """
    if not isinstance(pem_text, str):
        raise CertRefused("CSR must be PEM text")
    if len(pem_text) > CSR_MAX_BYTES:
        raise CertRefused("CSR is larger than %d bytes" % CSR_MAX_BYTES)
    if not pem_text.isascii():
        raise CertRefused("CSR is not PEM: it contains non-ASCII characters")
    blocks = pem_blocks(pem_text, CSR_PEM_LABELS)
    if len(blocks) != 1 or pem_text.count("-----BEGIN") != 1:
        raise CertRefused("CSR must be exactly one PEM 'CERTIFICATE REQUEST' block")
    facts = _parse_csr(blocks[0])
    _verify_csr_signature(facts.der)
    return facts


def _parse_csr(der: bytes) -> CsrFacts:
    """CsrFacts from a PKCS#10 DER structure, refusing anything that does not parse exactly."""
    outer = der_read(der, 0)
    if outer[2] != len(der):
        raise CertRefused("malformed DER: data after the CSR")
    info, _algorithm, signature = der_children(der, outer, TAG_SEQUENCE, "CSR", 3, 3)
    der_bit_string(der, signature, "CSR signature")
    parts = der_children(der, info, TAG_SEQUENCE, "CSR info", 3, 4)
    der_expect(parts[0], TAG_INTEGER, "CSR version")
    subject = _parse_name(der, parts[1])
    key_type, key_bits, ec_curve, key_oid = _parse_public_key(der, parts[2])
    extensions = _parse_attributes(der, parts[3]) if len(parts) == 4 else {}
    san_dns, san_other = [], []
    if OID_SUBJECT_ALT_NAME in extensions:
        san_dns, san_other = _parse_san(der, extensions[OID_SUBJECT_ALT_NAME])
    ca_requested = False
    if OID_BASIC_CONSTRAINTS in extensions:
        ca_requested = _parse_basic_constraints(der, extensions[OID_BASIC_CONSTRAINTS])
    return CsrFacts(subject, san_dns, san_other, ca_requested, key_type, key_bits,
                    ec_curve, key_oid, der)


def _parse_name(der: bytes, item: DerItem) -> List[Tuple[str, str]]:
    """Name ::= SEQUENCE OF SET OF {type OID, value string}, flattened to (oid, value) pairs."""
    pairs = []
    for rdn in der_children(der, item, TAG_SEQUENCE, "subject", 0, CSR_MAX_BYTES):
        for attribute in der_children(der, rdn, TAG_SET, "subject RDN", 1, CSR_MAX_BYTES):
            oid_item, value_item = der_children(der, attribute, TAG_SEQUENCE, "subject attribute", 2, 2)
            oid = der_oid(der, oid_item, "subject attribute")
            pairs.append((oid, der_string(der, value_item, "subject " + oid)))
    return pairs


def _parse_public_key(der: bytes, item: DerItem) -> Tuple[str, int, str, str]:
    """(key_type, key_bits, ec_curve, algorithm OID) from a SubjectPublicKeyInfo."""
    algorithm, key = der_children(der, item, TAG_SEQUENCE, "public key info", 2, 2)
    alg_items = der_children(der, algorithm, TAG_SEQUENCE, "key algorithm", 1, 2)
    oid = der_oid(der, alg_items[0], "key algorithm")
    key_start, key_end = der_bit_string(der, key, "public key")
    if oid == OID_RSA:
        rsa_key = der_read(der, key_start, key_end)
        if rsa_key[2] != key_end:
            raise CertRefused("malformed DER: data after the RSA public key")
        modulus, _exponent = der_children(der, rsa_key, TAG_SEQUENCE, "RSA public key", 2, 2)
        start, end = der_expect(modulus, TAG_INTEGER, "RSA modulus")
        return "rsa", int.from_bytes(der[start:end], "big").bit_length(), "", oid
    if oid == OID_EC:
        if len(alg_items) != 2 or alg_items[1][0] != TAG_OID:
            raise CertRefused("EC key must name its curve (explicit curve parameters are not accepted)")
        curve = der_oid(der, alg_items[1], "EC curve")
        return "ec", EC_CURVE_BITS.get(curve, 0), curve, oid
    if oid == OID_ED25519:
        return "ed25519", 256, "", oid
    return "other", 0, "", oid


def _parse_attributes(der: bytes, item: DerItem) -> Dict[str, Tuple[int, int]]:
    """Extensions requested in the CSR attributes, as {oid: bounds of the extnValue content}."""
    extensions = None
    for attribute in der_children(der, item, TAG_CONTEXT_0, "CSR attributes", 0, CSR_MAX_BYTES):
        oid_item, values = der_children(der, attribute, TAG_SEQUENCE, "CSR attribute", 2, 2)
        if der_oid(der, oid_item, "CSR attribute") != OID_EXTENSION_REQUEST:
            continue    # e.g. challengePassword: nothing from it reaches the certificate
        if extensions is not None:
            raise CertRefused("CSR carries more than one extension request")
        (requested,) = der_children(der, values, TAG_SET, "extension request", 1, 1)
        extensions = _parse_extensions(der, requested)
    return extensions or {}


def _parse_extensions(der: bytes, item: DerItem) -> Dict[str, Tuple[int, int]]:
    """Extensions ::= SEQUENCE OF {extnID, critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING}."""
    extensions = {}
    for extension in der_children(der, item, TAG_SEQUENCE, "extensions", 0, CSR_MAX_BYTES):
        parts = der_children(der, extension, TAG_SEQUENCE, "extension", 2, 3)
        oid = der_oid(der, parts[0], "extension")
        if len(parts) == 3:
            der_expect(parts[1], TAG_BOOLEAN, "extension critical flag")
        if oid in extensions:
            raise CertRefused("CSR requests extension %s twice" % oid)
        extensions[oid] = der_expect(parts[-1], TAG_OCTET_STRING, "extension value")
    return extensions


def _single_element(der: bytes, bounds: Tuple[int, int], what: str) -> DerItem:
    """The one element that must exactly fill an extension value."""
    item = der_read(der, bounds[0], bounds[1])
    if item[2] != bounds[1]:
        raise CertRefused("malformed DER: data after %s" % what)
    return item


def _parse_san(der: bytes, bounds: Tuple[int, int]) -> Tuple[List[str], List[str]]:
    """(DNS names, kinds of the other entries) of a subjectAltName extension value."""
    item = _single_element(der, bounds, "subjectAltName")
    dns, other = [], []
    for name in der_children(der, item, TAG_SEQUENCE, "subjectAltName", 1, CSR_MAX_BYTES):
        if name[0] == TAG_SAN_DNS:
            try:
                dns.append(der[name[1]:name[2]].decode("ascii"))
            except UnicodeDecodeError:
                raise CertRefused("CSR subjectAltName has a non-ASCII DNS name") from None
        else:
            other.append(SAN_KIND_BY_TAG.get(name[0], "tag 0x%02x" % name[0]))
    return dns, other


def _parse_basic_constraints(der: bytes, bounds: Tuple[int, int]) -> bool:
    """True if a basicConstraints extension value asks for cA (any non-zero BOOLEAN counts)."""
    item = _single_element(der, bounds, "basicConstraints")
    parts = der_children(der, item, TAG_SEQUENCE, "basicConstraints", 0, 2)
    if not parts or parts[0][0] != TAG_BOOLEAN:
        return False
    start, end = parts[0][1], parts[0][2]
    return any(der[start:end])


def _verify_csr_signature(der: bytes) -> None:
    """Refuse der unless openssl confirms its self-signature.

    OpenSSL 3.0 exits 0 on a bad signature, so success needs both exit 0 and
    the "verify OK" status line.
    """
    try:
        output = run_openssl(["req", "-verify", "-noout", "-inform", "DER"],
                             input_bytes=der, merge_stderr=True)
    except OpensslFailed as exc:
        raise CertRefused("CSR could not be read or verified by openssl: %s" % exc) from None
    lines = output.decode("utf-8", "replace").splitlines()
    if not any(line.strip() in VERIFY_OK_LINES for line in lines):
        raise CertRefused("CSR signature does not verify: it was not signed by its own key")


# ---- CSR policy ---------------------------------------------------------------

def check_csr_for(facts: CsrFacts, fqdn: str) -> None:
    """Raise CertRefused unless the CSR asks for exactly an end-entity certificate for fqdn.

    The subject must be the single attribute CN=fqdn and the SAN, if present,
    exactly [DNS:fqdn] (names compared case-insensitively); basicConstraints
    must not ask for a CA; the key must be RSA >= RSA_MIN_BITS bits, EC
    P-256/P-384 or Ed25519.  Other requested extensions are ignored: none is
    copied into the certificate.
    """
    want = fqdn.lower()
    if not facts.subject:
        raise CertRefused("CSR subject is empty, expected CN=%s" % fqdn)
    if len(facts.subject) != 1 or facts.subject[0][0] != OID_COMMON_NAME:
        found = ", ".join("%s=%s" % pair for pair in facts.subject)
        raise CertRefused("CSR subject must be exactly CN=%s, found %s" % (fqdn, _shown(found)))
    if facts.subject[0][1].lower() != want:
        raise CertRefused("CSR names %s, expected %s" % (_shown(facts.subject[0][1]), fqdn))
    if facts.san_other:
        raise CertRefused("CSR asks for %s subject alternative names; only DNS:%s is allowed"
                          % (", ".join(sorted(set(facts.san_other))), fqdn))
    if facts.san_dns and [name.lower() for name in facts.san_dns] != [want]:
        raise CertRefused("CSR subject alternative names are %s, expected only %s"
                          % (_shown(", ".join(facts.san_dns)), fqdn))
    if facts.ca_requested:
        raise CertRefused("CSR asks for a CA certificate; only end-entity certificates are issued")
    _check_key(facts)


def _check_key(facts: CsrFacts) -> None:
    """Refuse key types and sizes that are weak, exotic or too costly to verify."""
    if facts.key_type == "rsa" and not RSA_MIN_BITS <= facts.key_bits <= RSA_MAX_BITS:
        raise CertRefused("CSR has a %d-bit RSA key; use %d to %d bits, or an EC P-256 key"
                          % (facts.key_bits, RSA_MIN_BITS, RSA_MAX_BITS))
    if facts.key_type == "ec" and facts.ec_curve not in ACCEPTED_EC_CURVES:
        raise CertRefused("CSR has an EC key on curve %s; use P-256 or P-384" % facts.ec_curve)
    if facts.key_type not in ("rsa", "ec", "ed25519"):
        raise CertRefused("CSR key algorithm %s is not accepted; use EC P-256, P-384, "
                          "Ed25519 or RSA of at least %d bits" % (facts.key_oid, RSA_MIN_BITS))


# ---- certificates read back -------------------------------------------------------

def der_time(der: bytes, item: DerItem) -> int:
    """Epoch seconds of a UTCTime or GeneralizedTime element in the strict DER forms."""
    text = der[item[1]:item[2]].decode("ascii", "replace")
    if item[0] == TAG_UTC_TIME and re.fullmatch(r"[0-9]{12}Z", text):
        year = int(text[:2])
        text = ("19" if year >= 50 else "20") + text     # RFC 5280 4.1.2.5.1
    elif item[0] != TAG_GENERALIZED_TIME or not re.fullmatch(r"[0-9]{14}Z", text):
        raise CertRefused("malformed DER: bad certificate time")
    fields = [int(text[0:4])] + [int(text[i:i + 2]) for i in range(4, 14, 2)]
    if not (1 <= fields[1] <= 12 and 1 <= fields[2] <= 31 and fields[3] <= 23
            and fields[4] <= 59 and fields[5] <= 60):
        raise CertRefused("malformed DER: bad certificate time")
    return calendar.timegm(tuple(fields) + (0, 0, 0))


def cert_validity(cert_der: bytes) -> Tuple[int, int]:
    """(notBefore, notAfter) in epoch seconds of a DER certificate; CertRefused if malformed."""
    outer = der_read(cert_der, 0)
    tbs = der_children(cert_der, outer, TAG_SEQUENCE, "certificate", 3, 3)[0]
    fields = der_children(cert_der, tbs, TAG_SEQUENCE, "tbsCertificate", 6, 10)
    first = 1 if fields[0][0] == TAG_CONTEXT_0 else 0    # version [0] is optional
    not_before, not_after = der_children(cert_der, fields[first + 3], TAG_SEQUENCE, "validity", 2, 2)
    return der_time(cert_der, not_before), der_time(cert_der, not_after)


def openssl_time(epoch: int) -> str:
    """epoch as the YYYYMMDDHHMMSSZ form that `openssl ca -startdate/-enddate` takes."""
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(epoch))


# ---- files --------------------------------------------------------------------

def write_file_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace path with data so that readers, even after a crash, see the old or the new file whole.

    The data and the directory entry are fsynced before returning.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_text(path: str, what: str) -> str:
    """The ASCII text of path, or UsageError naming what it was meant to be."""
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError("cannot read %s %s: %s" % (what, path, exc)) from None


def _leaf_extensions(san: str, key_usage: str, extended_key_usage: str) -> List[str]:
    """The openssl config lines of an end-entity certificate; inputs are validated names only."""
    return ["basicConstraints = critical,CA:FALSE",
            "keyUsage = critical," + key_usage,
            "extendedKeyUsage = " + extended_key_usage,
            "subjectAltName = " + san,
            "subjectKeyIdentifier = hash",
            "authorityKeyIdentifier = keyid"]


def _ca_config(extension_lines: List[str]) -> str:
    """A minimal `openssl ca` config: relative paths only (run in a fresh directory), CN-only policy,
    no extension copied from the CSR, and the leaf extensions in section pipe2me_leaf."""
    return "\n".join([
        "[ca]", "default_ca = pipe2me_ca",
        "[pipe2me_ca]", "database = index.txt", "serial = serial", "new_certs_dir = new",
        "default_md = default", "policy = pipe2me_policy", "copy_extensions = none",
        "unique_subject = no", "email_in_dn = no",
        "[pipe2me_policy]", "commonName = supplied",
        "[pipe2me_leaf]"] + extension_lines) + "\n"


# ---- the CA ---------------------------------------------------------------------

class CertAuthority:
    """The server's CA, owning ca_dir: ca.key (0600), ca.pem and issued/<SERIAL>.pem.

    With ca_cert_file and ca_key_file (an intermediate CA; the cert file may
    be followed by its chain) those are used and no root is ever created.
    Call ensure() once before anything else; after that sign() and
    issue_server_cert() are safe to call from several threads.
    """

    def __init__(self, ca_dir: str, ca_cert_file: Optional[str] = None,
                 ca_key_file: Optional[str] = None) -> None:
        if (ca_cert_file is None) != (ca_key_file is None):
            raise UsageError("an operator CA needs both a certificate file and a key file")
        self.ca_dir = os.path.abspath(ca_dir)
        self.issued_dir = os.path.join(self.ca_dir, "issued")
        self.supplied = ca_cert_file is not None
        self.cert_file = os.path.abspath(ca_cert_file or os.path.join(self.ca_dir, "ca.pem"))
        self.key_file = os.path.abspath(ca_key_file or os.path.join(self.ca_dir, "ca.key"))
        self._chain_pem = ""
        self._validity = (0, 0)

    def ensure(self, domain: str) -> None:
        """Make the CA usable: create the root on first use, then load and check the CA.

        A root is "pipe2me CA <domain>", EC P-256, valid CA_VALIDITY_DAYS, and
        is written atomically (key first, cert last) so a crash leaves no half
        CA.  An existing root is kept even if domain changed: pods pinned it.
        Raises UsageError if the CA files are unusable, Unavailable if openssl is.
        """
        os.makedirs(self.ca_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.issued_dir, mode=0o700, exist_ok=True)
        if not self.supplied and not os.path.exists(self.cert_file):
            self._create_root(domain)
        text = _read_text(self.cert_file, "CA certificate")
        try:
            ders = pem_blocks(text, ("CERTIFICATE",))
            validity = cert_validity(ders[0]) if ders else None
        except CertRefused as exc:
            raise UsageError("CA certificate %s is unusable: %s" % (self.cert_file, exc)) from None
        if validity is None:
            raise UsageError("CA certificate %s holds no PEM certificate" % self.cert_file)
        if validity[1] <= time.time():
            raise UsageError("CA certificate %s has expired; supply a new CA" % self.cert_file)
        self._check_key_matches()
        self._chain_pem = "".join(der_to_pem(der, "CERTIFICATE") for der in ders)
        self._validity = validity

    def _create_root(self, domain: str) -> None:
        """Make a new self-signed root in ca_dir; nothing is written unless all steps succeed."""
        if not valid_fqdn(domain):
            raise UsageError("cannot create a CA for %r: not a valid domain name" % domain)
        key = run_openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"])
        # OpenSSL 3.0 does not read "-key -" from stdin, /dev/stdin does work.
        cert = run_openssl(["req", "-x509", "-new", "-key", "/dev/stdin", "-config", os.devnull,
                            "-subj", "/CN=pipe2me CA " + domain, "-days", str(CA_VALIDITY_DAYS),
                            "-addext", "basicConstraints=critical,CA:TRUE",
                            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                            "-addext", "subjectKeyIdentifier=hash"], input_bytes=key)
        # Key before cert: ensure() creates a root while ca.pem is missing, so a
        # crash between the two writes is repaired by the next start.
        write_file_atomic(self.key_file, key, 0o600)
        write_file_atomic(self.cert_file, cert, 0o644)

    def _check_key_matches(self) -> None:
        """UsageError unless the CA key exists, is unencrypted and belongs to the CA cert."""
        if not os.path.exists(self.key_file):
            raise UsageError("CA key %s is missing: restore it (pods trust %s)"
                             % (self.key_file, self.cert_file))
        try:
            from_key = run_openssl(["pkey", "-in", self.key_file, "-passin", "pass:", "-pubout"])
            from_cert = run_openssl(["x509", "-in", self.cert_file, "-noout", "-pubkey"])
        except OpensslFailed as exc:
            raise UsageError("CA key or certificate is unusable: %s" % exc) from None
        if from_key.strip() != from_cert.strip():
            raise UsageError("CA key %s does not belong to CA certificate %s"
                             % (self.key_file, self.cert_file))

    def ca_pem(self) -> str:
        """What GET /cacert serves: the CA certificate followed by its chain, PEM."""
        return self._chain_pem

    def sign(self, csr_pem: str, fqdn: str, not_after_epoch: float) -> str:
        """Sign a pod's CSR for fqdn and return the leaf certificate PEM.

        The CSR is inspected and checked (CertRefused with a one-line reason);
        the certificate gets subject CN=fqdn and SAN DNS:fqdn whatever the CSR
        asked, is no CA, has EKU serverAuth+clientAuth and ends no later than
        not_after_epoch or the CA itself.  Every issued cert is kept in issued/.
        """
        if not valid_fqdn(fqdn):
            raise CertRefused("cannot certify %s: not a valid host name" % _shown(str(fqdn)))
        facts = inspect_csr(csr_pem)
        check_csr_for(facts, fqdn)
        start, end = self._window(not_after_epoch)
        key_usage = "digitalSignature,keyEncipherment" if facts.key_type == "rsa" else "digitalSignature"
        extensions = _leaf_extensions("DNS:" + fqdn, key_usage, "serverAuth,clientAuth")
        return self._issue(der_to_pem(facts.der, "CERTIFICATE REQUEST"), fqdn, extensions, start, end)

    def _window(self, not_after_epoch: float) -> Tuple[int, int]:
        """(start, end) for a new certificate, inside the CA's own validity."""
        now = int(time.time())
        start = max(now - LEAF_BACKDATE_S, self._validity[0])
        end = min(int(not_after_epoch), self._validity[1])
        if end <= now:
            raise CertRefused("the tunnel (or the CA) expires before a certificate could start")
        return start, end

    def _issue(self, csr_pem: str, common_name: str, extension_lines: List[str],
               start: int, end: int) -> str:
        """Run `openssl ca` for csr_pem in a fresh directory and record the result in issued/.

        common_name and extension_lines must hold validated names only.
        """
        # 128 bits with the top one set: always 32 hex digits, 127 of them random.
        serial = "%032X" % (secrets.randbits(128) | (1 << 127))
        with tempfile.TemporaryDirectory(prefix="pipe2me-ca-") as work:
            for name, text in (("index.txt", ""), ("serial", serial + "\n"),
                               ("ca.cnf", _ca_config(extension_lines)), ("req.pem", csr_pem)):
                with open(os.path.join(work, name), "w", encoding="ascii") as handle:
                    handle.write(text)
            os.mkdir(os.path.join(work, "new"))
            run_openssl(["ca", "-config", "ca.cnf", "-extensions", "pipe2me_leaf", "-batch",
                         "-notext", "-in", "req.pem", "-out", "leaf.pem",
                         "-subj", "/CN=" + common_name, "-cert", self.cert_file,
                         "-keyfile", self.key_file, "-passin", "pass:",
                         "-startdate", openssl_time(start), "-enddate", openssl_time(end)],
                        cwd=work)
            with open(os.path.join(work, "leaf.pem"), "r", encoding="ascii") as handle:
                leaf = handle.read()
        write_file_atomic(os.path.join(self.issued_dir, serial + ".pem"), leaf.encode("ascii"))
        return leaf

    def issue_server_cert(self, names: Sequence[str], ips: Sequence[str], key_path: str,
                          cert_path: str, days: int) -> bool:
        """Give the server a TLS certificate (SAN: DNS names and IP addresses) at key_path/cert_path.

        Reuses the existing pair when it was issued by this CA for the same
        names, and stays valid for more than SERVER_CERT_RENEW_BEFORE_S;
        otherwise makes a new EC P-256 key and certificate valid `days` (capped
        by the CA).  Returns True if a new certificate was issued.  The
        `<cert_path>.json` record is written last, so a crash mid-way means
        "issue again".  Raises UsageError for an invalid name or address.
        """
        record = self._server_record(names, ips)
        if self._server_cert_reusable(record, key_path, cert_path):
            return False
        if os.path.exists(cert_path + ".json"):
            os.unlink(cert_path + ".json")
        key = run_openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"])
        common_name = (record["names"] + record["ips"])[0]
        csr = run_openssl(["req", "-new", "-key", "/dev/stdin", "-config", os.devnull,
                           "-subj", "/CN=" + common_name], input_bytes=key)
        san = ",".join(["DNS:" + name for name in record["names"]] +
                       ["IP:" + address for address in record["ips"]])
        extensions = _leaf_extensions(san, "digitalSignature", "serverAuth")
        start, end = self._window(time.time() + days * 86400)
        leaf = self._issue(csr.decode("ascii"), common_name, extensions, start, end)
        write_file_atomic(key_path, key, 0o600)
        write_file_atomic(cert_path, leaf.encode("ascii"), 0o644)
        write_file_atomic(cert_path + ".json", json.dumps(record, sort_keys=True).encode("ascii"))
        return True

    def _server_record(self, names: Sequence[str], ips: Sequence[str]) -> dict:
        """The JSON record that identifies a server certificate: its SANs and the CA that signed it."""
        bad = [name for name in names if not valid_fqdn(name)]
        if bad:
            raise UsageError("server certificate name %s is not a valid host name" % _shown(str(bad[0])))
        try:
            addresses = [str(ipaddress.ip_address(address)) for address in ips]
        except ValueError as exc:
            raise UsageError("server certificate address: %s" % exc) from None
        if not names and not addresses:
            raise UsageError("a server certificate needs at least one name or address")
        ca_id = hashlib.sha256(self._chain_pem.encode("ascii")).hexdigest()
        return {"version": 1, "names": [name.lower() for name in names], "ips": addresses, "ca": ca_id}

    def _server_cert_reusable(self, record: dict, key_path: str, cert_path: str) -> bool:
        """True if the certificate at cert_path matches record and has life left."""
        try:
            with open(cert_path + ".json", "r", encoding="ascii") as handle:
                stored = json.load(handle)
            with open(cert_path, "r", encoding="ascii") as handle:
                ders = pem_blocks(handle.read(), ("CERTIFICATE",))
        except (OSError, ValueError, CertRefused):
            return False
        if stored != record or not ders or not os.path.exists(key_path):
            return False
        try:
            not_after = cert_validity(ders[0])[1]
        except CertRefused:
            return False
        return not_after - time.time() > SERVER_CERT_RENEW_BEFORE_S

# =====================================================================
# API — the HTTP API on the bare domain (JSON, or shell format with
# ?format=shell); served in threads handed over by the fronts
# =====================================================================

class BadTokenLimiter:
    """Counts failed token uses per client address; thread-safe."""

    def __init__(self, limit=BAD_TOKEN_LIMIT, window_s=BAD_TOKEN_WINDOW_S):
        self.limit, self.window_s = limit, window_s
        self.failures = {}
        self.lock = threading.Lock()

    def blocked(self, address, now=None):
        now = now or time.monotonic()
        with self.lock:
            recent = [t for t in self.failures.get(address, []) if now - t < self.window_s]
            self.failures[address] = recent
            return len(recent) >= self.limit

    def record(self, address, now=None):
        with self.lock:
            self.failures.setdefault(address, []).append(now or time.monotonic())
            if len(self.failures) > 10000:  # bounded: forget the oldest addresses
                for key in list(self.failures)[:5000]:
                    del self.failures[key]


class Api:
    """What the request handlers work with; one per server."""

    def __init__(self, settings, store, ca):
        self.settings, self.store, self.ca = settings, store, ca
        self.tokens = {}
        self.limiter = BadTokenLimiter()
        self.metrics = lambda: ""
        self.status_lines = lambda: []
        self.reachability = None  # set by DNS wiring when available

    # -- tunnel creation ------------------------------------------------
    def create_tunnel(self, token, protocols, address):
        if not token:
            raise ApiError(401, "a token is required (token=...)")
        if self.limiter.blocked(address):
            raise ApiError(429, "too many invalid tokens from %s; wait a minute" % address)
        options = self.tokens.get(token)
        if options is None:
            self.limiter.record(address)
            raise ApiError(403, "invalid token")
        protocols = self.check_protocols(protocols)
        if len(protocols) > options["max_ports"]:
            raise ApiError(422, "%d ports requested, the token allows %d"
                           % (len(protocols), options["max_ports"]))
        record, secret = self.store.create(token, options, protocols)
        log.info("tunnel created tunnel=%s fqdn=%s ports=%s from=%s",
                 record["id"], record["fqdn"], record["ports"], address)
        return dict(public_view(record, self.settings), secret=secret)

    @staticmethod
    def check_protocols(protocols):
        if isinstance(protocols, str):
            protocols = [p for p in re.split(r"[\s,]+", protocols) if p]
        if not isinstance(protocols, list) or not protocols:
            raise ApiError(400, "protocols must be a non-empty list")
        unknown = [p for p in protocols if p not in PROTOCOL_PORTS]
        if unknown:
            raise ApiError(400, "unknown protocol %s (known: %s)"
                           % (str(unknown[0])[:40], ", ".join(PROTOCOL_PORTS)))
        return protocols

    # -- one tunnel -----------------------------------------------------
    def tunnel_for(self, tunnel_id, secret):
        """The record if the secret matches; ApiError otherwise."""
        record = self.store.get(tunnel_id) if TUNNEL_ID.fullmatch(tunnel_id) else None
        if record is None:
            raise ApiError(404, "unknown tunnel %s" % tunnel_id[:40])
        if not secret or not secrets.compare_digest(sha256_hex(secret), record["secret_sha256"]):
            raise ApiError(401, "wrong or missing tunnel secret (Authorization: Bearer ...)")
        return record

    def verify(self, tunnel_id):
        record = self.store.get(tunnel_id) if TUNNEL_ID.fullmatch(tunnel_id) else None
        if record is None:
            raise ApiError(404, "unknown tunnel", status="unknown")
        view = {"status": tunnel_status(record), "fqdn": record["fqdn"],
                "expires_at": record["expires_at"]}
        if view["status"] == "expired":
            raise ApiError(410, "tunnel %s expired" % record["fqdn"], **view)
        return view

    def sign(self, record, csr):
        if not isinstance(csr, str) or not csr.strip():
            raise ApiError(400, "csr (PEM) is required")
        if tunnel_status(record) != "online":
            raise ApiError(410, "tunnel %s expired" % record["fqdn"])
        cert = self.ca.sign(csr, record["fqdn"], record["expires_at"])
        fingerprint = sha256_hex(ssl.PEM_cert_to_DER_cert(cert))
        fingerprints = (record.get("cert_sha256", []) + [fingerprint])[-5:]
        self.store.update(record["id"], cert_sha256=fingerprints)
        log.info("certificate signed tunnel=%s fqdn=%s", record["id"], record["fqdn"])
        return {"cert": cert, "not_after": record["expires_at"]}

    def extend(self, record, token, address):
        if self.limiter.blocked(address):
            raise ApiError(429, "too many invalid tokens from %s; wait a minute" % address)
        options = self.tokens.get(token or "")
        if options is None:
            self.limiter.record(address)
            raise ApiError(403, "invalid token")
        if not options["extend"]:
            raise ApiError(403, "this token may not extend tunnels (extend:false)")
        expires = max(record["expires_at"], int(time.time())) + options["lifespan"]
        updated = self.store.update(record["id"], expires_at=expires)
        log.info("tunnel extended tunnel=%s expires_at=%d", record["id"], expires)
        return public_view(updated, self.settings)

    def delete(self, record):
        self.store.delete(record["id"])
        log.info("tunnel deleted tunnel=%s fqdn=%s", record["id"], record["fqdn"])
        return {"deleted": record["id"]}

    def config(self):
        s = self.settings
        return {"protocol_version": PROTOCOL_VERSION, "tunnel_domain": s.tunnel_domain,
                "tunnel_port": s.tunnel_port, "http_port": s.http_port,
                "https_port": s.https_port, "protocols": list(PROTOCOL_PORTS)}


class ApiError(Exception):
    """An API answer other than 2xx: status, one-line message, extra JSON keys."""

    def __init__(self, http_status, message, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = http_status, message, extra


ROUTES = [
    ("GET", r"/", "page_status"),
    ("GET", r"/config", "page_config"),
    ("GET", r"/cacert", "page_cacert"),
    ("GET", r"/metrics", "page_metrics"),
    ("POST", r"/tunnels", "post_tunnels"),
    ("GET", r"/tunnels/(?P<id>[^/]+)", "get_tunnel"),
    ("DELETE", r"/tunnels/(?P<id>[^/]+)", "delete_tunnel"),
    ("GET", r"/tunnels/(?P<id>[^/]+)/verify", "get_verify"),
    ("POST", r"/tunnels/(?P<id>[^/]+)/cert", "post_cert"),
    ("POST", r"/tunnels/(?P<id>[^/]+)/extend", "post_extend"),
    ("POST", r"/tunnels/(?P<id>[^/]+)/check", "post_check"),
]


class ApiHandler(http.server.BaseHTTPRequestHandler):
    """One API request per connection (HTTP/1.0). `server` is the Api object.

    Every answer is JSON (or shell format); failures are 4xx with
    {"error": ...}; nothing here raises past handle()."""

    server_version = "pipe2me"
    protocol_version = "HTTP/1.0"
    timeout = 10

    def __getattr__(self, name):
        if name.startswith("do_"):
            return self.dispatch
        raise AttributeError(name)

    def dispatch(self):
        url = urllib.parse.urlsplit(self.path)
        self.query = urllib.parse.parse_qs(url.query)
        try:
            handler, params = self.route(self.command, url.path.rstrip("/") or "/")
            status, body = handler(**params)
        except ApiError as exc:
            status, body = exc.status, dict(exc.extra, error=exc.message)
        except Pipe2meError as exc:
            status, body = exc.http_status, {"error": str(exc)}
        self.reply(status, body)

    def route(self, method, path):
        allowed = []
        for verb, pattern, name in ROUTES:
            match = re.fullmatch(pattern, path)
            if match and verb == method:
                return getattr(self, name), match.groupdict()
            if match:
                allowed.append(verb)
        if allowed:
            raise ApiError(405, "method %s not allowed on %s" % (method[:20], path[:80]))
        raise ApiError(404, "no such endpoint %s" % path[:80])

    # -- request and answer -------------------------------------------
    def body(self):
        length = self.headers.get("Content-Length")
        if length is None:
            return {}
        if not length.isdigit():
            raise ApiError(400, "bad Content-Length")
        if int(length) > API_MAX_BODY_BYTES:
            raise ApiError(413, "request body over %d bytes" % API_MAX_BODY_BYTES)
        raw = self.rfile.read(int(length))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "request body is not UTF-8") from None
        if "json" in self.headers.get("Content-Type", "") or text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except ValueError:
                raise ApiError(400, "request body is not valid JSON") from None
            if not isinstance(data, dict):
                raise ApiError(400, "request body must be a JSON object")
            return data
        return {k: v[-1] for k, v in urllib.parse.parse_qs(text).items()}

    def secret(self, body=None):
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth[7:].strip()
        return (body or {}).get("secret") or (self.query.get("secret") or [""])[-1]

    def wants_shell(self):
        return self.query.get("format", [""])[-1] == "shell" or \
            "text/x-shellscript" in self.headers.get("Accept", "")

    def reply(self, status, body, content_type=None):
        if isinstance(body, str):
            data, ctype = body.encode(), content_type or "text/plain; charset=utf-8"
        elif self.wants_shell():
            data, ctype = shell_format(body).encode(), "text/plain; charset=utf-8"
        else:
            data, ctype = (json.dumps(body) + "\n").encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, huge headers) as JSON 4xx."""
        self.close_connection = True
        if code >= 500:
            code = 400
        try:
            self.reply(code, {"error": message or "bad request"})
        except OSError:
            pass

    def log_message(self, fmt, *args):
        log.debug("api %s %s", self.address_string(), fmt % args)

    # -- endpoints ------------------------------------------------------
    def page_status(self):
        lines = ["pipe2me server for %s" % self.server.settings.tunnel_domain, ""]
        return 200, "\n".join(lines + self.server.status_lines()) + "\n"

    def page_config(self):
        return 200, self.server.config()

    def page_cacert(self):
        return 200, self.server.ca.ca_pem()

    def page_metrics(self):
        return 200, self.server.metrics()

    def post_tunnels(self):
        body = self.body()
        token = body.get("token") or body.get("auth")
        view = self.server.create_tunnel(token, body.get("protocols", "https"),
                                         self.client_address[0])
        return 201, view

    def get_tunnel(self, id):
        return 200, public_view(self.server.tunnel_for(id, self.secret()), self.server.settings)

    def delete_tunnel(self, id):
        return 200, self.server.delete(self.server.tunnel_for(id, self.secret()))

    def get_verify(self, id):
        return 200, self.server.verify(id)

    def post_cert(self, id):
        body = self.body()
        return 200, self.server.sign(self.server.tunnel_for(id, self.secret(body)), body.get("csr"))

    def post_extend(self, id):
        body = self.body()
        record = self.server.tunnel_for(id, self.secret(body))
        return 200, self.server.extend(record, body.get("token") or body.get("auth"),
                                       self.client_address[0])

    def post_check(self, id):
        record = self.server.tunnel_for(id, self.secret(self.body()))
        if self.server.reachability is None:
            raise ApiError(404, "reachability checks are not available on this server")
        return 200, self.server.reachability(record, self.client_address[0])

# =====================================================================
# TUNNEL SESSIONS — authenticates pods on TUNNEL_PORT and keeps one live
# session per tunnel; used by the fronts to open streams
# =====================================================================

class PodSession(Mux):
    """The server's end of one pod's tunnel connection."""

    def __init__(self, hub, record, sock, address):
        self.hub, self.tunnel_id, self.fqdn = hub, record["id"], record["fqdn"]
        self.address = address
        self.draining = False
        self.saved_in = self.saved_out = 0
        super().__init__(hub.loop, sock, POD_SENDS, log, hub.settings.heartbeat_interval)
        if record.get("rate"):
            self.pace = RateCap(record["rate"]).pace

    def on_control(self, msg, obj):
        if msg == Msg.GOAWAY:
            log.info("pod going away tunnel=%s reason=%s", self.tunnel_id,
                     str(obj.get("reason"))[:200])
            self.draining = True
            return
        raise ProtocolError("unexpected %s after HELLO" % msg.name)

    def on_stream_closed(self, stream):
        if self.draining and not self.streams:
            self.destroy("drained")

    def on_closed(self, reason):
        log.info("pod disconnected tunnel=%s pod=%s reason=%s",
                 self.tunnel_id, self.address, reason)
        self.hub.on_session_closed(self)

    def unsaved_traffic(self):
        """(bytes_in, bytes_out) since the last call; bytes_in = consumer to pod."""
        got_in = self.local_read_bytes - self.saved_in
        got_out = self.local_written_bytes - self.saved_out
        self.saved_in, self.saved_out = self.local_read_bytes, self.local_written_bytes
        return got_in, got_out


class RateCap:
    """Token bucket for a tunnel's `rate` (bytes per second, both directions
    together, bursts of up to one second); Mux.pace calls pace()."""

    def __init__(self, rate):
        self.rate, self.allowance, self.stamp = rate, float(rate), time.monotonic()

    def pace(self, nbytes):
        now = time.monotonic()
        self.allowance = min(self.rate, self.allowance + (now - self.stamp) * self.rate) - nbytes
        self.stamp = now
        return -self.allowance / self.rate if self.allowance < 0 else 0


def traffic_left(record):
    """Bytes the tunnel may still move under its token's max_traffic (None = no cap)."""
    cap = record.get("max_traffic") or 0
    return cap - record["bytes_in"] - record["bytes_out"] if cap else None


class PodGate:
    """Authenticates pod connections in short-lived threads (TLS handshake and
    HELLO are blocking with a deadline), then hands them to the loop."""

    def __init__(self, settings, store, tls_context, loop, attach):
        self.settings, self.store, self.context = settings, store, tls_context
        self.loop, self.attach = loop, attach
        self.slots = threading.BoundedSemaphore(MAX_PENDING_HANDSHAKES)

    def admit(self, sock, address):
        if not self.slots.acquire(blocking=False):
            log.warning("too many pod handshakes, closing pod=%s", address[0])
            return sock.close()
        threading.Thread(target=self.authenticate, args=(sock, address),
                         name="pod-handshake", daemon=True).start()

    def authenticate(self, sock, address):
        peer = "%s:%d" % address[:2]
        try:
            sock.setblocking(True)
            sock.settimeout(HELLO_TIMEOUT_S)
            tls = self.context.wrap_socket(sock, server_side=True)
            record = self.greet(tls)
            tls.settimeout(None)
            self.loop.call_soon_threadsafe(lambda: self.attach(record, tls, peer))
        except ProtocolError as exc:
            log.warning("pod refused pod=%s reason=%s", peer, exc)
            sock.close()
        except (OSError, ValueError) as exc:
            log.info("pod handshake failed pod=%s reason=%s", peer, exc)
            sock.close()
        finally:
            self.slots.release()

    def greet(self, tls):
        """Read HELLO, check it against the client certificate, answer."""
        msg, _stream, payload = read_frame_blocking(
            tls, POD_SENDS, time.monotonic() + HELLO_TIMEOUT_S)
        if msg != Msg.HELLO:
            raise ProtocolError("first frame is %s, not HELLO" % msg.name)
        record, reason, permanent = self.judge(tls, decode_control(payload))
        if reason:
            tls.sendall(encode_control(Msg.REJECT, {"reason": reason, "permanent": permanent}))
            tls.close()
            raise ProtocolError(reason)
        tls.sendall(encode_control(Msg.WELCOME, {
            "tunnel": record["id"], "fqdn": record["fqdn"],
            "services": [{"protocol": p, "port": n}
                         for p, n in zip(record["protocols"], record["ports"])],
            "heartbeat_interval_s": self.settings.heartbeat_interval}))
        return record

    def judge(self, tls, hello):
        """Return (record, refusal reason or None, whether the refusal is final)."""
        if hello.get("kind") != "control":
            return None, "first frame must name kind 'control'", True
        if hello.get("version") != PROTOCOL_VERSION:
            return None, ("protocol version %r not supported; this server speaks %d"
                          % (hello.get("version"), PROTOCOL_VERSION)), True
        der = tls.getpeercert(binary_form=True)
        record = self.store.by_cert(sha256_hex(der)) if der else None
        if record is None:
            return None, "certificate belongs to no tunnel here (deleted?)", True
        if hello.get("tunnel") != record["id"]:
            return None, "HELLO names another tunnel than the certificate", True
        if tunnel_status(record) != "online":
            return None, "tunnel %s expired" % record["fqdn"], True
        left = traffic_left(record)
        if left is not None and left <= 0:
            return None, "tunnel %s used up its traffic allowance" % record["fqdn"], True
        return record, None, False

# =====================================================================
# FRONTS — where consumers arrive: each tunnel's public ports, the
# Host-routed HTTP front and the SNI-routed HTTPS front. They look up the
# live session through `hub` (WIRING) and open streams on it.
# =====================================================================

ACCEPT_BATCH = 64
ACCEPT_PAUSE_S = 0.5  # after EMFILE: stop accepting briefly instead of spinning


class Listener:
    """A listening socket in the loop; on_accept(sock, address) gets each new
    connection. Survives EMFILE/ENFILE by pausing, never by closing."""

    def __init__(self, loop, sock, on_accept, name):
        self.loop, self.sock, self.on_accept, self.name = loop, sock, on_accept, name
        sock.setblocking(False)
        loop.watch(sock, EVENT_READ, self.on_event)
        self.closed = False

    def on_event(self, _mask):
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return self.pause(exc)
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.on_accept(conn, address)

    def pause(self, exc):
        log.warning("accept paused listener=%s error=%s", self.name, exc)
        self.loop.watch(self.sock, 0)
        self.loop.call_later(ACCEPT_PAUSE_S, self.resume)

    def resume(self):
        if not self.closed:
            self.loop.watch(self.sock, EVENT_READ, self.on_event)

    def close(self):
        if not self.closed:
            self.closed = True
            self.loop.watch(self.sock, 0)
            self.sock.close()


def bind_listener(address, port, kind=socket.SOCK_STREAM):
    """A bound (and for TCP listening) socket; Unavailable naming the port if taken."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise Unavailable("cannot listen on %s port %d: %s" % (address, port, exc.strerror)) from None
    return sock


class Sniffer:
    """Peeks at a new front connection until `parse(head)` decides, without
    consuming bytes, so the chosen destination sees the connection untouched.

    parse returns None for "need more" or a callable(sock) that takes the
    connection over. Gives up after FRONT_SNIFF_DEADLINE_S or
    FRONT_SNIFF_BYTES. Retries by timer with backoff so a partial head does
    not make the selector spin."""

    def __init__(self, loop, sock, parse, on_give_up):
        self.loop, self.sock, self.parse, self.on_give_up = loop, sock, parse, on_give_up
        self.deadline = time.monotonic() + FRONT_SNIFF_DEADLINE_S
        self.delay = 0.005
        sock.setblocking(False)
        loop.watch(sock, EVENT_READ, self.on_event)

    def on_event(self, _mask):
        self.loop.watch(self.sock, 0)
        self.peek()

    def peek(self):
        try:
            head = self.sock.recv(FRONT_SNIFF_BYTES, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            head = None
        except OSError:
            return self.sock.close()
        if head == b"":
            return self.sock.close()
        decision = self.parse(head) if head else None
        if decision is not None:
            return decision(self.sock)
        if time.monotonic() > self.deadline or (head and len(head) >= FRONT_SNIFF_BYTES):
            return self.on_give_up(self.sock)
        self.loop.call_later(self.delay, self.peek)
        self.delay = min(self.delay * 2, 0.25)


def http_head_host(head):
    """Host of a complete HTTP request head, "" when it has none, None if incomplete."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return None
    for line in head[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"host":
            host = value.strip().decode("latin-1").lower()
            return re.sub(r":\d+$", "", host).strip("[]").rstrip(".")
    return ""


def http_head_path(head):
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    return parts[1].decode("latin-1") if len(parts) == 3 and parts[1].startswith(b"/") else "/"


def tls_client_hello_sni(head):
    """SNI of a TLS ClientHello: the name, "" without SNI, None if incomplete.
    Raises ValueError for bytes that are not a ClientHello."""
    if len(head) < 5:
        return None
    if head[0] != 22 or head[1] != 3:
        raise ValueError("not a TLS handshake")
    record_len = int.from_bytes(head[3:5], "big")
    if len(head) < 5 + record_len:
        return None
    body = head[5:5 + record_len]
    if len(body) < 4 or body[0] != 1:
        raise ValueError("not a ClientHello")
    pos = 4 + 2 + 32                                   # type+len, version, random
    pos += 1 + body[pos]                               # session id
    pos += 2 + int.from_bytes(body[pos:pos + 2], "big")  # cipher suites
    pos += 1 + body[pos]                               # compression methods
    end = pos + 2 + int.from_bytes(body[pos:pos + 2], "big")
    pos += 2
    while pos + 4 <= min(end, len(body)):
        ext_type = int.from_bytes(body[pos:pos + 2], "big")
        ext_len = int.from_bytes(body[pos + 2:pos + 4], "big")
        if ext_type == 0:
            name_len = int.from_bytes(body[pos + 7:pos + 9], "big")
            return body[pos + 9:pos + 9 + name_len].decode("ascii").lower().rstrip(".")
        pos += 4 + ext_len
    return ""


def answer_and_close(sock, status, reason, headers=(), body=""):
    """A tiny HTTP/1.0 answer from the front itself (404, 308, 503)."""
    payload = body.encode()
    lines = ["HTTP/1.0 %d %s" % (status, reason), "Content-Type: text/plain",
             "Content-Length: %d" % len(payload), "Connection: close"] + list(headers)
    try:
        sock.setblocking(True)
        sock.settimeout(2)
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()


class Fronts:
    """Routes front connections by Host or SNI; public ports by port number."""

    def __init__(self, loop, settings, hub, api_server):
        self.loop, self.settings, self.hub, self.api_server = loop, settings, hub, api_server

    def is_api_name(self, name):
        domain = self.settings.tunnel_domain
        if name in ("", domain, "localhost") or not name.endswith("." + domain):
            return True
        return False

    # -- HTTP front -----------------------------------------------------
    def on_http_accept(self, sock, address):
        Sniffer(self.loop, sock, lambda head: self.route_http(head, address),
                lambda s: answer_and_close(s, 431, "Request Header Fields Too Large"))

    def route_http(self, head, address):
        host = http_head_host(head)
        if host is None:
            return None
        if self.is_api_name(host):
            return lambda sock: self.api_server.serve(sock, address, tls=False)
        record = self.hub.store.by_fqdn(host)
        if record is None or tunnel_status(record) != "online":
            return lambda sock: answer_and_close(sock, 404, "Not Found", body="no tunnel %s\n" % host)
        if "http" in record["protocols"]:
            port = record["ports"][record["protocols"].index("http")]
            return lambda sock: self.hub.open_stream(record["id"], port, sock, address)
        if "https" in record["protocols"]:
            port = record["ports"][record["protocols"].index("https")]
            target = "https://%s:%d%s" % (host, port, http_head_path(head))
            return lambda sock: answer_and_close(
                sock, 308, "Permanent Redirect", ["Location: " + target], target + "\n")
        return lambda sock: answer_and_close(sock, 404, "Not Found", body="no http service\n")

    # -- HTTPS front ----------------------------------------------------
    def on_https_accept(self, sock, address):
        Sniffer(self.loop, sock, lambda head: self.route_https(head, address),
                lambda s: s.close())

    def route_https(self, head, address):
        try:
            name = tls_client_hello_sni(head)
        except (ValueError, IndexError, UnicodeDecodeError):
            return lambda sock: sock.close()
        if name is None:
            return None
        if self.is_api_name(name):
            return lambda sock: self.api_server.serve(sock, address, tls=True)
        record = self.hub.store.by_fqdn(name)
        if record is None or "https" not in record["protocols"] or tunnel_status(record) != "online":
            return lambda sock: sock.close()
        port = record["ports"][record["protocols"].index("https")]
        return lambda sock: self.hub.open_stream(record["id"], port, sock, address)

# =====================================================================
# WIRING — the Server: binds listeners, owns the loop, the hub of live
# sessions, signals and periodic sweeps; built by main()
# =====================================================================

SERVER_CERT_DAYS = 90  # renewed at start when less than a week is left


class ApiServer:
    """Runs API requests in threads (at most API_MAX_CONNECTIONS at once) and
    closes any that outlive API_REQUEST_DEADLINE_S."""

    def __init__(self, api, tls_context):
        self.api, self.tls_context = api, tls_context
        self.slots = threading.BoundedSemaphore(API_MAX_CONNECTIONS)
        self.deadlines = {}
        self.lock = threading.Lock()

    def serve(self, sock, address, tls):
        sock.setblocking(True)
        if not self.slots.acquire(blocking=False):
            return answer_and_close(sock, 429, "Too Many Requests", body="server busy\n")
        with self.lock:
            self.deadlines[sock] = time.monotonic() + API_REQUEST_DEADLINE_S
        threading.Thread(target=self.handle, args=(sock, address, tls),
                         name="api", daemon=True).start()

    def handle(self, sock, address, tls):
        conn = sock
        try:
            sock.settimeout(ApiHandler.timeout)
            if tls:
                conn = self.tls_context.wrap_socket(sock, server_side=True)
            ApiHandler(conn, address, self.api)
        except (OSError, ValueError) as exc:
            log.debug("api connection failed from=%s error=%s", address[0], exc)
        finally:
            with self.lock:
                self.deadlines.pop(sock, None)
            with contextlib.suppress(OSError):
                conn.close()
            self.slots.release()

    def expire(self, now):
        """Shut down connections past their deadline (slow clients)."""
        with self.lock:
            late = [s for s, deadline in self.deadlines.items() if deadline < now]
        for sock in late:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class Hub:
    """Live pod sessions and the public listeners of every online tunnel.
    Lives in the loop thread; other threads reach it through call_soon."""

    def __init__(self, loop, settings, store):
        self.loop, self.settings, self.store = loop, settings, store
        self.sessions = {}
        self.listeners = {}  # port -> (tunnel id, Listener)
        self.accepting = True

    def attach(self, record, tls, peer):
        """A pod passed the gate: it replaces any older session of its tunnel."""
        current = self.store.get(record["id"])
        if not self.accepting or current is None or tunnel_status(current) != "online":
            tls.close()
            return
        old = self.sessions.pop(record["id"], None)
        if old is not None:
            old.destroy("replaced by a new connection from %s" % peer)
        self.sessions[record["id"]] = PodSession(self, current, tls, peer)
        log.info("pod connected tunnel=%s fqdn=%s pod=%s", record["id"], record["fqdn"], peer)

    def on_session_closed(self, session):
        if self.sessions.get(session.tunnel_id) is session:
            del self.sessions[session.tunnel_id]
        self.save_traffic(session)

    def save_traffic(self, session):
        got_in, got_out = session.unsaved_traffic()
        self.store.add_traffic(session.tunnel_id, got_in, got_out)

    def open_stream(self, tunnel_id, port, sock, address):
        session = self.sessions.get(tunnel_id)
        if session is None or session.closed or session.draining:
            log.debug("consumer refused, pod offline tunnel=%s from=%s", tunnel_id, address[0])
            return sock.close()
        cap = self.settings.max_streams_per_tunnel
        if cap and len(session.streams) >= cap:
            log.warning("stream cap reached tunnel=%s cap=%d", tunnel_id, cap)
            return sock.close()
        session.open_stream(sock, port)

    def sync(self, _tunnel_id=None):
        """Make listeners and sessions match the store (after any change)."""
        now = time.time()
        wanted = {}
        for record in self.store.all():
            if tunnel_status(record, now) == "online" and self.accepting:
                wanted.update({port: record["id"] for port in record["ports"]})
        for port, (tunnel_id, listener) in list(self.listeners.items()):
            if wanted.get(port) != tunnel_id:
                listener.close()
                del self.listeners[port]
        for port, tunnel_id in wanted.items():
            if port not in self.listeners:
                self.listen(port, tunnel_id)
        for tunnel_id in [t for t in self.sessions if t not in set(wanted.values())]:
            self.sessions[tunnel_id].destroy("tunnel expired or deleted")

    def listen(self, port, tunnel_id):
        try:
            sock = bind_listener(self.settings.listen_address, port)
        except Unavailable as exc:
            log.error("public port unavailable tunnel=%s error=%s", tunnel_id, exc)
            return
        on_accept = lambda conn, address: self.open_stream(tunnel_id, port, conn, address)
        self.listeners[port] = (tunnel_id, Listener(self.loop, sock, on_accept, "port %d" % port))

    def enforce_traffic_caps(self):
        """Close sessions whose tunnel used up its token's max_traffic."""
        for session in list(self.sessions.values()):
            record = self.store.get(session.tunnel_id)
            left = traffic_left(record) if record else None
            moved = (session.local_read_bytes - session.saved_in
                     + session.local_written_bytes - session.saved_out)
            if left is not None and moved >= left:
                log.warning("traffic allowance used up tunnel=%s", session.tunnel_id)
                session.destroy("traffic allowance used up")

    def stream_count(self):
        return sum(len(s.streams) for s in self.sessions.values())


class Server:
    """Everything a running server owns, started by start() and run by run()."""

    def __init__(self, settings):
        self.settings = settings
        self.loop = EventLoop()
        self.store = Store(settings)
        self.ca = CertAuthority(os.path.join(settings.state_dir, "ca"),
                                settings.ca_cert or None, settings.ca_key or None)
        self.api = Api(settings, self.store, self.ca)
        self.hub = Hub(self.loop, settings, self.store)
        self.front_listeners = []
        self.lock_fd = None
        self.stopping = False
        self.last_traffic_save = time.monotonic()

    # -- start-up -------------------------------------------------------
    def prepare_state(self):
        """State dir, lock, CA, tokens; prints a first token on first start."""
        os.makedirs(self.settings.state_dir, mode=0o700, exist_ok=True)
        self.lock_fd = lock_state_dir(self.settings.state_dir)
        self.ca.ensure(self.settings.tunnel_domain)
        created = ensure_tokens_file(self.settings.tokens_file)
        self.api.tokens = load_tokens(self.settings.tokens_file)
        count = self.store.load()
        log.info("state loaded dir=%s tunnels=%d tokens=%d", self.settings.state_dir,
                 count, len(self.api.tokens))
        return created

    def server_tls_context(self):
        names = [self.settings.tunnel_domain]
        ips = sorted({"127.0.0.1", "::1", *self.settings.public_address}
                     | ({self.settings.listen_address} - {"0.0.0.0", "::"}))
        key = os.path.join(self.ca.ca_dir, "server.key")
        cert = os.path.join(self.ca.ca_dir, "server.pem")
        self.ca.issue_server_cert(names, ips, key, cert, SERVER_CERT_DAYS)
        self.server_cert_files = (cert, key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert, key)
        return context

    def pod_tls_context(self, base_cert_files):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(*base_cert_files)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=self.ca.ca_pem())
        return context

    def bind_all(self):
        """Bind every fixed listener; Unavailable (exit 3) names a taken port."""
        s = self.settings
        api_context = self.server_tls_context()
        self.api_server = ApiServer(self.api, api_context)
        self.fronts = Fronts(self.loop, s, self.hub, self.api_server)
        gate_context = self.pod_tls_context(self.server_cert_files)
        self.gate = PodGate(s, self.store, gate_context, self.loop, self.hub.attach)
        plan = [("http", s.http_port, self.fronts.on_http_accept),
                ("https", s.https_port, self.fronts.on_https_accept),
                ("tunnel", s.tunnel_port, self.gate.admit)]
        bound = {}
        for name, port, on_accept in plan:
            sock = bind_listener(s.listen_address, port)
            bound[name] = sock.getsockname()[1]
            self.front_listeners.append(Listener(self.loop, sock, on_accept, name))
        s.http_port, s.https_port, s.tunnel_port = bound["http"], bound["https"], bound["tunnel"]
        return bound

    def start(self):
        created = self.prepare_state()
        try:
            bound = self.bind_all()
        except BaseException:
            if created:  # the token was never printed: the next start makes and prints one
                with contextlib.suppress(OSError):
                    os.unlink(self.settings.tokens_file)
            raise
        self.store.on_change = lambda tid: self.loop.call_soon_threadsafe(self.hub.sync)
        self.hub.sync()
        self.api.metrics = self.metrics_text
        self.api.status_lines = self.status_lines
        self.loop.call_later(SWEEP_INTERVAL_S, self.sweep)
        if created:
            print_first_token(self.settings, created)
        log.info("ready http=%s:%d https=%s:%d tunnel=%s:%d domain=%s",
                 self.settings.listen_address, bound["http"], self.settings.listen_address,
                 bound["https"], self.settings.listen_address, bound["tunnel"],
                 self.settings.tunnel_domain)

    # -- running --------------------------------------------------------
    def sweep(self):
        now = time.time()
        self.api_server.expire(time.monotonic())
        self.store.purge_stale(now)
        if any(tunnel_status(self.store.get(t) or {"expires_at": 0}, now) != "online"
               for t in [l[0] for l in self.hub.listeners.values()]):
            self.hub.sync()
        if time.monotonic() - self.last_traffic_save > TRAFFIC_SAVE_INTERVAL_S:
            self.last_traffic_save = time.monotonic()
            for session in list(self.hub.sessions.values()):
                self.hub.save_traffic(session)
        self.expire_idle_streams()
        self.hub.enforce_traffic_caps()
        self.loop.call_later(SWEEP_INTERVAL_S, self.sweep)

    def expire_idle_streams(self):
        limit = self.settings.stream_idle_timeout
        if not limit:
            return
        cutoff = time.monotonic() - limit
        for session in list(self.hub.sessions.values()):
            for stream in [s for s in session.streams.values() if s.last_active < cutoff]:
                log.info("stream idle timeout tunnel=%s stream=%d", session.tunnel_id, stream.id)
                stream.abort("idle for %d s" % limit)

    def reload(self):
        """SIGHUP: tokens and tunnel files are read again."""
        self.api.tokens = load_tokens(self.settings.tokens_file)
        count = self.store.load()
        self.hub.sync()
        log.info("reloaded tokens=%d tunnels=%d", len(self.api.tokens), count)

    def drain(self):
        """SIGTERM: stop accepting, tell pods, let streams finish, then stop."""
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping: no new connections, streams=%d", self.hub.stream_count())
        for listener in self.front_listeners:
            listener.close()
        self.hub.accepting = False
        self.hub.sync()  # closes public listeners
        for session in list(self.hub.sessions.values()):
            session.send_control(Msg.GOAWAY, {"reason": "server shutting down"})
        self.finish_by = time.monotonic() + self.settings.shutdown_grace
        self.wait_for_streams()

    def wait_for_streams(self):
        if self.hub.stream_count() and time.monotonic() < self.finish_by:
            self.loop.call_later(0.1, self.wait_for_streams)
            return
        for session in list(self.hub.sessions.values()):
            session.destroy("server stopped")
        self.loop.stop()

    def run(self):
        signal.signal(signal.SIGTERM, lambda *_: self.loop.call_soon_threadsafe(self.drain))
        signal.signal(signal.SIGINT, lambda *_: self.loop.call_soon_threadsafe(self.drain))
        signal.signal(signal.SIGHUP, lambda *_: self.loop.call_soon_threadsafe(self.reload))
        self.loop.run()
        log.info("stopped")

    # -- what the API shows ---------------------------------------------
    def metrics_text(self):
        records = self.store.all()
        now = time.time()
        lines = [
            "# HELP pipe2me_tunnels Tunnels known to the server, by status.",
            "# TYPE pipe2me_tunnels gauge",
            'pipe2me_tunnels{status="online"} %d' % sum(tunnel_status(r, now) == "online" for r in records),
            'pipe2me_tunnels{status="expired"} %d' % sum(tunnel_status(r, now) == "expired" for r in records),
            "# HELP pipe2me_pods_connected Pods with a live tunnel connection.",
            "# TYPE pipe2me_pods_connected gauge",
            "pipe2me_pods_connected %d" % len(self.hub.sessions),
            "# HELP pipe2me_streams_open Consumer streams being relayed.",
            "# TYPE pipe2me_streams_open gauge",
            "pipe2me_streams_open %d" % self.hub.stream_count(),
            "# HELP pipe2me_tunnel_bytes_total Bytes relayed per tunnel (in = consumer to pod).",
            "# TYPE pipe2me_tunnel_bytes_total counter",
        ]
        for r in records:
            lines.append('pipe2me_tunnel_bytes_total{fqdn="%s",direction="in"} %d' % (r["fqdn"], r["bytes_in"]))
            lines.append('pipe2me_tunnel_bytes_total{fqdn="%s",direction="out"} %d' % (r["fqdn"], r["bytes_out"]))
        return "\n".join(lines) + "\n"

    def status_lines(self):
        records = self.store.all()
        return ["tunnels: %d" % len(records), "pods connected: %d" % len(self.hub.sessions),
                "streams open: %d" % self.hub.stream_count()]


def lock_state_dir(state_dir):
    """Hold STATE_DIR/server.lock for the life of the process, or refuse (exit 3)."""
    path = os.path.join(state_dir, "server.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise Unavailable("another pipe2me server is running on %s" % state_dir) from None
    os.ftruncate(fd, 0)
    os.write(fd, b"%d\n" % os.getpid())
    return fd


def running_server_pid(state_dir):
    """PID of the server holding the lock on state_dir, or None."""
    path = os.path.join(state_dir, "server.lock")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it
    except OSError:
        text = os.read(fd, 32).decode().strip()
        return int(text) if text.isdigit() else None
    finally:
        os.close(fd)


def ensure_tokens_file(path):
    """Write a tokens file with one fresh token if none exists; returns it or None."""
    if os.path.exists(path):
        return None
    name = new_token_name()
    options = {key: default for key, (default, _) in TOKEN_OPTIONS.items()}
    options.update(max_ports=4, extend=True)
    text = ("# pipe2me tokens: name = option:value ...\n"
            "# options: max_ports lifespan(s/m/h/d) extend unique max_traffic(K/M/G) rate\n"
            + format_token_line(name, options) + "\n")
    write_atomic(path, text, 0o600)
    return name


def print_first_token(settings, token):
    host = "127.0.0.1" if settings.tunnel_domain.endswith("localhost") else settings.tunnel_domain
    print("token: %s" % token)
    print("pod command: python3 pipe2me_pod.py setup --server http://%s:%d --auth %s"
          " --protocols http,https --local-ports 8100,8101" % (host, settings.http_port, token))
    sys.stdout.flush()

# =====================================================================
# CLI — the server in the foreground, admin commands, main()
# =====================================================================

def notify_server(settings):
    """Ask a running server (if any) to reload: admin changes take effect now."""
    pid = running_server_pid(settings.state_dir)
    if pid:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGHUP)


def cmd_tokens(settings, args):
    path = settings.tokens_file
    tokens = load_tokens(path)
    if args.action == "list":
        for name, options in tokens.items():
            print(format_token_line(mask_secret(name), options))
        return 0
    if args.action == "add":
        name = args.name or new_token_name()
        if not TOKEN_NAME.fullmatch(name):
            raise UsageError("a token name needs 4+ characters without spaces, '=' or '#'")
        if name in tokens:
            raise UsageError("token %s exists already" % mask_secret(name))
        try:
            options = parse_token_line("%s = %s" % (name, " ".join(args.options)))[1]
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        append_token(path, name, options)
        print(name)
    else:
        if not args.name or args.name not in tokens:
            raise UsageError("no such token")
        remove_token(path, args.name)
    notify_server(settings)
    return 0


def append_token(path, name, options):
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if old and not old.endswith("\n"):
        old += "\n"
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    write_atomic(path, old + format_token_line(name, options) + "\n", 0o600)


def remove_token(path, name):
    lines = open(path, encoding="utf-8").read().splitlines(True)
    kept = [l for l in lines if l.partition("=")[0].strip() != name]
    write_atomic(path, "".join(kept), 0o600)


def cmd_tunnels(settings, args):
    store = Store(settings)
    store.load()
    if args.action == "list":
        for r in sorted(store.all(), key=lambda r: r["created_at"]):
            print("%s  %-40s %-7s %s" % (r["id"], r["fqdn"], tunnel_status(r),
                                         ",".join("%s:%d" % pair for pair in zip(r["protocols"], r["ports"]))))
        return 0
    record = store.get(args.id or "") if TUNNEL_ID.fullmatch(args.id or "") else None
    if record is None:
        raise NotFound("no tunnel %s in %s" % (args.id, settings.tunnel_dir))
    if args.action == "show":
        print(json.dumps(public_view(record, settings), indent=2))
        return 0
    store.delete(record["id"])
    notify_server(settings)
    print("removed %s %s" % (record["id"], record["fqdn"]))
    return 0


def cmd_check_config(settings, _args):
    for key in CONFIG_KEYS:
        value = getattr(settings, key.lower())
        if isinstance(value, range):
            value = "%d..%d" % (value[0], value[-1])
        if key == "DYNAMIC_DNS_SERVICE" and value.startswith("dnsimple:"):
            value = "dnsimple:" + mask_secret(value.split(":")[1])
        print("%s=%s  # %s" % (key, value, settings.origins[key]))
    return 0


def cmd_dns_refresh(settings, _args):
    if not settings.dynamic_dns_service:
        raise UsageError("DYNAMIC_DNS_SERVICE is empty: there are no DNS records to refresh")
    raise UsageError("dns-refresh is not available yet")


def cmd_serve(settings, _args):
    raise_open_file_limit()
    server = Server(settings)
    server.start()
    server.run()
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="pipe2me_server.py", description="pipe2me tunnel server")
    parser.add_argument("--config", help="configuration file (default ~/pipe2me.server.conf)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    for key, (_, _, text) in CONFIG_KEYS.items():
        parser.add_argument("--" + key.lower().replace("_", "-"), dest=key, help=text)
    commands = parser.add_subparsers(dest="command")
    tokens = commands.add_parser("tokens", help="list, add or remove auth tokens")
    tokens.add_argument("action", choices=["list", "add", "remove"])
    tokens.add_argument("name", nargs="?")
    tokens.add_argument("options", nargs="*", help="option:value, e.g. max_ports:3 lifespan:7d")
    tunnels = commands.add_parser("tunnels", help="list, show or remove tunnels")
    tunnels.add_argument("action", choices=["list", "show", "remove"])
    tunnels.add_argument("id", nargs="?")
    commands.add_parser("check-config", help="validate and print the configuration")
    commands.add_parser("dns-refresh", help="reconcile DNS records (cron)")
    return parser


COMMANDS = {None: cmd_serve, "tokens": cmd_tokens, "tunnels": cmd_tunnels,
            "check-config": cmd_check_config, "dns-refresh": cmd_dns_refresh}


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s")
    flags = {key: getattr(args, key) for key in CONFIG_KEYS}
    try:
        settings = load_settings(args.config, flags)
        return COMMANDS[args.command](settings, args)
    except Pipe2meError as exc:
        print("pipe2me_server: %s" % exc, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
