#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""pipe2me pod: publish TCP services of this machine through a pipe2me server.

One file, standard library only, meant to be copied onto a router or any
machine behind NAT. It creates a tunnel on a pipe2me server, keeps the key,
certificate and settings of that tunnel in a directory, and runs the tunnel.

Usage:
    python3 pipe2me_pod.py [--dir DIR] [-v|-q|--silent] [-k] COMMAND ...

    setup --server URL --auth TOKEN [--protocols http,https] [--local-ports 8100,HOST:PORT]
          [--proxy-protocol v1|v2] [--cacert FILE]
    env                     settings as KEY='value' lines: eval $(python3 pipe2me_pod.py env)
    verify                  print the FQDN while the tunnel exists and has not expired
    start [--echo] [--on-cert-change CMD]   run the tunnel in the foreground
    status                  whether `start` runs and is connected (exit 0 only then)
    update [--auth TOKEN] [--proxy-protocol v1|v2|off]   refresh, renew, extend, change
    check                   ask the server to probe this pod's public address
    map-ports               open the public ports on the router
    clear [--yes]           delete the tunnel on the server and the files here
    service --systemd|--procd|--sysv   print a service definition for `start`

Results go to stdout, logs and the one-line error to stderr. Exit codes:
0 ok, 1 bug, 2 usage or bad setup, 3 unavailable (worth retrying),
4 rejected (bad token, expired: not worth retrying), 130 interrupted.

Sections, in the order a tunnel comes to life:
    SHARED base          the Pipe2meError tree and exit codes, the service
                         protocols, the host-name check, atomic files, the
                         openssl wrapper
    SETTINGS             constants and defaults, the log
    HELPERS              .inc quoting and parsing, reading and writing files
    SHARED protocol      the wire contract
    SHARED relay         the selector loop and the stream relay
    SHARED process       descriptor limit and the re-exec from compiled code
    POD FILES            the files of a pod directory, the key and CSR, the ACME chain
    SERVER API CLIENT    HTTP(S) calls to the server's JSON API
    ROUTER PORT MAPPING  NAT-PMP and UPnP IGD: the public ports opened on the router
    TUNNEL CLIENT        `start`: the tunnel connection, streams to local services, reconnects
    ECHO SERVICES        `start --echo`: built-in local services for end-to-end checks
    COMMANDS             one function per command
    CLI                  argument parsing, logging, main()

The SHARED blocks are byte-identical with pipe2me_server.py.

Glossary: *server* (the public pipe2me host), *pod* (this machine),
*consumer* (connects to a public port), *tunnel* (one FQDN with its
services), *service* (one protocol and port of a tunnel), *stream* (one
consumer connection carried to the pod), *token* (allows creating a tunnel),
*secret* (allows managing one tunnel), *CA* (the server's certificate
authority, pinned by the pod after setup).

Requires Python 3.8 or newer and the `openssl` command-line tool.
"""

import collections
import contextlib
import enum
import errno
import fcntl
import heapq
import ipaddress
import json
import marshal
import mmap
import os
import random
import re
import resource
import selectors
import shlex
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import types
import urllib.parse

# ---- BEGIN SHARED base (identical in pipe2me_server.py and pipe2me_pod.py) ----
# What every section of both programs stands on: the one exception tree and
# its exit codes, the services a tunnel may publish, peer text made safe for
# logs, the host-name check, files replaced atomically, the one wrapper
# through which openssl runs, times as the CLI prints them, and the one
# HTTP exchange both make with other hosts, bounded in all.

EXIT_INTERRUPTED = 130                # main() after Ctrl-C; the tree below carries 1 to 4
SERVICE_PROTOCOLS = ("http", "https", "imap", "imaps", "smtp", "smtps", "ssh", "tcp")
HOSTNAME_MAX_CHARS = 253
HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
LAN_NAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")  # names on a LAN may hold '_'
OPENSSL_TIMEOUT_S = 60


class Pipe2meError(Exception):
    """An expected failure: main() prints the message alone and returns
    exit_code. The server's API answers http_status (the class's, or one
    given to this raise) with {"error": message} plus the `details` keys."""
    exit_code = 1
    http_status = 500

    def __init__(self, message, http_status=None, **details):
        super().__init__(message)
        if http_status is not None:
            self.http_status = http_status
        self.details = details


class UsageError(Pipe2meError):
    """Bad arguments, configuration or setup: fix the call, not worth retrying as is."""
    exit_code = 2
    http_status = 400


class Unavailable(Pipe2meError):
    """Something needed cannot be reached or failed: worth retrying later."""
    exit_code = 3
    http_status = 503


class Rejected(Pipe2meError):
    """Refused (bad token, expired, unknown): not worth retrying."""
    exit_code = 4
    http_status = 403


class NotFound(Rejected):
    """What was asked for does not exist (an unknown tunnel, endpoint or file)."""
    http_status = 404


class Expired(Rejected):
    """The tunnel's lifetime is over."""
    http_status = 410


class CertRefused(Rejected):
    """A CSR the server will not sign; the message says why."""
    http_status = 400


class OpensslFailed(Unavailable):
    """openssl ran and exited non-zero; the message carries its last stderr line."""


# C0 and C1 controls, DEL and the Unicode line breaks, as \xNN / \uNNNN: text
# a peer sent (a reason, a name, a request line) cannot start a log line.
CONTROL_ESCAPES = {c: "\\x%02x" % c for c in list(range(32)) + list(range(127, 160))}
CONTROL_ESCAPES.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def printable(text, limit=300):
    """Peer text (any object, as str) made safe for a log line, a header or a page: its
    first `limit` characters, ASCII, all else escaped (\\n, \\x1b, \\u2028)."""
    return str(text)[:limit].encode("unicode_escape").decode("ascii")


def is_hostname(name, underscores=False):
    """True for dot-separated LDH labels (1-63 characters, no hyphen at either end),
    HOSTNAME_MAX_CHARS at most; underscores=True also lets labels hold '_', as LAN
    names may. Only such names reach an openssl -subj, a file or a header."""
    label = LAN_NAME_LABEL if underscores else HOSTNAME_LABEL
    return (isinstance(name, str) and 0 < len(name) <= HOSTNAME_MAX_CHARS
            and all(label.fullmatch(part) for part in name.split(".")))


def write_atomic(path, data, mode=0o644, durable=True):
    """Replace `path` by `data` (bytes or str) with file mode `mode`, so that a
    crash leaves the old or the new content, whole. The temporary file is made
    0600, so a secret is never readable by others, not even for a moment.
    durable=False skips the fsyncs (for files rewritten often and worthless
    after a crash, on a router's flash). OSError leaves no temporary file."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, ".%s.%d.%s.tmp" % (
        os.path.basename(path), os.getpid(), os.urandom(4).hex()))
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            if durable:
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    if durable:
        fsync_dir(directory)


def fsync_dir(directory):
    """Make a rename in `directory` durable; a file system that cannot fsync a
    directory is let be (the rename still happened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def run_openssl(args, input_bytes=None, cwd=None, merge_stderr=False):
    """Run `openssl ARGS...` (argv list, no shell) and return its stdout bytes.

    The only place either program runs openssl. stdin is `input_bytes` or
    empty (so a passphrase prompt can never hang); merge_stderr=True returns
    stderr interleaved with stdout, for the few commands that report only
    there. A missing openssl is a UsageError naming the package; a timeout
    (OPENSSL_TIMEOUT_S) or a failure to start it is Unavailable; a non-zero exit
    is OpensslFailed with openssl's last stderr line (where it puts the error)."""
    import subprocess  # here, not at the top: the pod's `start` never runs openssl (RSS)
    argv = ["openssl"] + [str(arg) for arg in args]
    stdin = {"input": input_bytes} if input_bytes is not None else {"stdin": subprocess.DEVNULL}
    try:
        done = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, timeout=OPENSSL_TIMEOUT_S,
                              stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                              check=False, **stdin)
    except subprocess.TimeoutExpired:
        raise Unavailable("openssl %s did not finish within %s s" % (argv[1], OPENSSL_TIMEOUT_S)) from None
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and exc.filename == "openssl":
            raise UsageError("the openssl command was not found: install the package "
                             "'openssl' (Debian/Ubuntu) or 'openssl-util' (OpenWrt)") from None
        raise Unavailable("cannot run openssl %s: %s" % (argv[1], exc)) from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).decode("utf-8", "replace").splitlines()
        last = next((line.strip()[:300] for line in reversed(lines) if line.strip()), "no message")
        raise OpensslFailed("openssl %s failed (exit %d): %s" % (argv[1], done.returncode, last))
    return done.stdout


def iso_time(epoch):
    """An epoch as 2026-12-02T05:10:00Z; "" for None."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)) if epoch else ""


def http_exchange(request, timeout_s, limit, handlers=(), context=None, redirects=True):
    """(status, headers, first `limit` bytes of the body) of the urllib `request`,
    error statuses included (a 3xx too, with redirects=False); socket.timeout
    once `timeout_s` has passed in all. urllib's timeout bounds each read, so
    a peer sending a byte a second would hold the caller for hours: at the
    deadline a timer shuts the socket."""
    import http.client
    import urllib.error
    import urllib.request
    opened, expired = [], threading.Event()

    def cut(connection):
        # urllib sets .sock to None once the head is read; the body comes on `kept`
        sock = connection.sock or getattr(connection, "kept", None)
        if expired.is_set() and sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def expire():
        expired.set()
        for connection in list(opened):
            cut(connection)

    def bounded(base):
        """The http.client connection class `base`, its socket cut at the deadline."""
        class Connection(base):
            def connect(self):
                opened.append(self)
                super().connect()
                self.kept = self.sock
                cut(self)  # the deadline passed while it connected
        return Connection

    class Bounded(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
        """urllib's http: and https: handler, opening bounded connections."""
        def http_open(self, req):
            return self.do_open(bounded(http.client.HTTPConnection), req)

        def https_open(self, req):
            return self.do_open(bounded(http.client.HTTPSConnection), req, context=self._context)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        """A 3xx is the answer, not a new request."""
        def redirect_request(self, *args, **kwargs):
            return None

    handlers = tuple(handlers) + (() if redirects else (NoRedirect(),))
    opener = urllib.request.build_opener(Bounded(context=context), *handlers)
    timer = threading.Timer(timeout_s, expire)
    timer.start()
    try:
        try:
            response = opener.open(request, timeout=timeout_s)
        except urllib.error.HTTPError as error:
            response = error
        with response:
            answer = response.getcode(), response.headers, response.read(limit)
    except (OSError, http.client.HTTPException):
        if not expired.is_set():
            raise
    finally:
        timer.cancel()
    if expired.is_set():
        raise socket.timeout("timed out after %g s" % timeout_s)
    return answer
# ---- END SHARED base ----

# =====================================================================
# SETTINGS — constants and defaults; read by every section below
# =====================================================================

VERSION = "1.0"
LOGGER_NAME = "pipe2me.pod"
LOG_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "SILENT": 100}


class PodLog:
    """The pod's log: lines like the logging module's `%(asctime)s
    %(levelname)s %(name)s %(message)s` on stderr. Not the logging module
    itself: it would add 1 MB to the 20 a pod may take on a router."""

    def __init__(self, name):
        self.name, self.level = name, LOG_LEVELS["WARNING"]

    def debug(self, message, *args):
        """Log at DEBUG (shown with -v)."""
        self.write("DEBUG", message, args)

    def info(self, message, *args):
        """Log at INFO."""
        self.write("INFO", message, args)

    def warning(self, message, *args):
        """Log at WARNING (the default level)."""
        self.write("WARNING", message, args)

    def write(self, level, message, args):
        """One line on stderr if `level` is shown; a closed stderr is ignored."""
        if LOG_LEVELS[level] < self.level or sys.stderr is None:
            return
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        try:
            text = (message % args if args else message).translate(CONTROL_ESCAPES)
            sys.stderr.write("%s,%03d %s %s %s\n" % (stamp, int(now % 1 * 1000), level,
                                                     self.name, text))
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # stderr gone (closed terminal): the pod runs on


log = PodLog(LOGGER_NAME)

DIR_ENV = "PIPE2ME_DIR"

INFO_FILE = "pipe2me.info.inc"        # from the server; holds the secret
LOCAL_FILE = "pipe2me.local.inc"      # from the pod: server URL, local ports
KEY_FILE = "pipe2me.openssl.priv"     # EC P-256 private key, never leaves the pod
CERT_FILE = "pipe2me.openssl.cert"    # what https services present: the ACME chain, else the server CA's
TUNNEL_CERT_FILE = "pipe2me.tunnel.cert"  # signed by the server's CA: the tunnel connection's own
CACERT_FILE = "pipe2me.cacert"        # the server's CA, pinned after setup
POD_FILES = (INFO_FILE, LOCAL_FILE, KEY_FILE, CERT_FILE, TUNNEL_CERT_FILE, CACERT_FILE)

SECRET_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
POD_DIR_MODE = 0o700

DEFAULT_PROTOCOLS = ("https",)

API_TIMEOUT_S = 15
API_MAX_ANSWER_BYTES = 1024 * 1024
API_BUSY_RETRIES = 5          # a 429 "busy, retry in N s" is tried again this often ...
API_BUSY_MAX_WAIT_S = 5       # ... when N is at most this (longer waits are the caller's)
# Renew when the certificate expires within this fraction of its lifetime.
CERT_RENEW_REMAINING_FRACTION = 2.0 / 3.0

# =====================================================================
# HELPERS — .inc files, reading and writing the pod's files; used by all below
# =====================================================================

INC_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def shell_quote(value):
    """Quote `value` in single quotes so that any POSIX shell reads it back verbatim."""
    return "'" + str(value).replace("'", "'\\''") + "'"


def format_inc(values, comment=None):
    """Render a dict as `KEY='value'` lines, sourceable by sh."""
    lines = ["# " + comment] if comment else []
    lines += ["%s=%s" % (key, shell_quote(value)) for key, value in values.items()]
    return "\n".join(lines) + "\n"


def parse_inc(text, where):
    """A dict of `KEY=value` lines (sh quoting, `#` comments, optional `export`);
    UsageError naming `where`."""
    values = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = INC_LINE.match(line)
        try:
            words = shlex.split(match.group(2), comments=True) if match else None
        except ValueError as exc:
            words, reason = None, str(exc).lower()
        else:
            reason = "expected KEY='value'"
        if words is None or len(words) > 1:
            raise UsageError("%s line %d: %s; fix or remove the file"
                             % (where, number, reason))
        values[match.group(1)] = words[0] if words else ""
    return values


def read_text(path):
    """The text of `path`, or None when it does not exist."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError("cannot read %s: %s" % (path, error_text(exc)))


def write_file_atomic(path, data, mode=PUBLIC_FILE_MODE, durable=True):
    """write_atomic() for the pod's files: a failure is one UsageError line."""
    try:
        write_atomic(path, data, mode, durable)
    except OSError as exc:
        raise UsageError("cannot write %s: %s" % (path, error_text(exc)))


def remove_file(path):
    """Remove `path` if it exists; True when something was removed."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise UsageError("cannot remove %s: %s" % (path, error_text(exc)))


def error_text(exc):
    """The short reason of an exception: its strerror, else its text, else its type."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__

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
HELLO_TIMEOUT_S = 10                  # the pod's wait for WELCOME (the server's: HELLO_TIMEOUT)
HEARTBEAT_INTERVAL_S = 10             # PING when idle; silent for 3x = dead


class Msg(enum.IntEnum):
    """Frame types. Payloads: JSON objects for control frames on stream 0."""
    HELLO = 1    # pod: {"kind": "control", "version", "tunnel", "features", "yield"} — first
                 # frame; "yield": true (a pod that was replaced) takes no live session over
    WELCOME = 2  # server: {"tunnel", "fqdn", "services", "heartbeat_interval_s", "proxy_protocol",
                 # "http_port", "https_port"}
    REJECT = 3   # server: {"reason", "permanent", "replaced_by"}; the connection then closes
    OPEN = 4     # server: a consumer arrived; payload u16 public port, then
                 # (for a pod whose HELLO lists "consumer_address") the
                 # consumer's and the public end's address, see encode_open()
    DATA = 5     # both: stream bytes, at most the peer's remaining credit
    WINDOW = 6   # both: payload u32 credit returned for this stream
    EOF = 7      # both: the sender will send no more DATA on this stream
    RESET = 8    # both: the stream is aborted; payload utf-8 reason (see below)
    PING = 9     # both: payload echoed back in PONG
    PONG = 10    # both
    GOAWAY = 11  # both: {"reason", "replaced_by", "permanent"}; no new streams, running ones
                 # may finish; "permanent" (tunnel deleted or expired): do not reconnect
    CERT = 12    # server: {"state", "reason", "next_try_at", "not_after", "chain"?}: the
    #              tunnel's publicly trusted (ACME) certificate and why it is (not) there;
    #              sent only to a pod whose HELLO lists FEATURE_CERT, after WELCOME and
    #              on every change


POD_SENDS = frozenset({Msg.HELLO, Msg.DATA, Msg.WINDOW, Msg.EOF, Msg.RESET,
                       Msg.PING, Msg.PONG, Msg.GOAWAY})
SERVER_SENDS = frozenset({Msg.WELCOME, Msg.REJECT, Msg.OPEN, Msg.DATA,
                          Msg.WINDOW, Msg.EOF, Msg.RESET, Msg.PING, Msg.PONG,
                          Msg.GOAWAY, Msg.CERT})
U16 = struct.Struct("!H")
U32 = struct.Struct("!I")
# Optional additions a side announces (HELLO "features"); a peer that does not
# list one never receives it, so pods and servers of protocol 1 without it
# keep working with those that have it.
FEATURE_CONSUMER_ADDRESS = "consumer_address"   # OPEN carries the addresses
FEATURE_CERT = "cert"                           # the pod takes CERT frames
POD_FEATURES = (FEATURE_CONSUMER_ADDRESS, FEATURE_CERT)
OPEN_FAMILIES = {4: (socket.AF_INET, 4), 6: (socket.AF_INET6, 16)}


def encode_open(port, consumer=None, public=None):
    """OPEN's payload: u16 public port; with both addresses ((ip, port) of the
    consumer and of the public end it reached) also u8 IP version (4 or 6),
    consumer address, u16 consumer port, public address, u16 public port."""
    payload = U16.pack(port)
    if consumer is None or public is None:
        return payload
    version = 6 if ":" in consumer[0] else 4
    family = OPEN_FAMILIES[version][0]
    return payload + bytes([version]) + b"".join(
        socket.inet_pton(family, ip) + U16.pack(number) for ip, number in (consumer, public))


def decode_open(payload):
    """(public port, consumer (ip, port) or None, public end (ip, port) or None)."""
    if len(payload) == U16.size:
        return U16.unpack(payload)[0], None, None
    family, size = OPEN_FAMILIES.get(payload[2] if len(payload) > 2 else 0, (None, 0))
    if family is None or len(payload) != 3 + 2 * (size + U16.size):
        raise ProtocolError("bad OPEN payload of %d bytes" % len(payload))
    consumer, public = [(socket.inet_ntop(family, bytes(payload[start:start + size])),
                         U16.unpack_from(payload, start + size)[0])
                        for start in (3, 3 + size + U16.size)]
    return U16.unpack_from(payload)[0], consumer, public
# A pod's RESET reason for a local service it cannot reach starts with one of
# these; the server's HTTP front answers 504 for the first, 503 for the other
# (text from older pods: 504 if it says "timed out", else 503).
RESET_CONNECT_TIMED_OUT = "local connect timed out"
RESET_CONNECT_FAILED = "local connect failed"


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
    """Splits a byte stream into frames. DATA payloads pass on as they arrive
    (cut-through), maybe in pieces, as memoryviews valid only until the next call;
    other frames come whole, as bytes. At most one control frame is buffered; an
    unknown type or an oversized frame is a ProtocolError, nothing else raises."""

    def __init__(self, allowed):
        self.allowed = allowed
        self.buffer = bytearray()   # the header or control frame being assembled
        self.header = None          # (msg, stream, length) once a header is whole
        self.data_stream = 0        # DATA payload in progress: its stream ...
        self.data_left = 0          # ... and how much of it is still to come

    def frames(self, data):
        """Yield (msg, stream, payload) for each frame (or DATA piece) `data` completes."""
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
        """The whole non-DATA frame in the buffer; the buffer is emptied."""
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
    """Exactly `size` bytes from a blocking socket before `deadline`, or ProtocolError."""
    data = bytearray()
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProtocolError("greeting not complete before its deadline")
        sock.settimeout(remaining)  # the deadline bounds the whole greeting, not each read
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
MAX_BUFFERED_BYTES = 64 * 1024 * 1024   # default budget of a loop (and of one Mux) for peer bytes
CONTROL_REPLY_LIMIT_BYTES = MUX_HIGH_WATER_BYTES  # a PONG is dropped while more waits unsent
MUX_FRAMES_PER_TURN = 4096            # then other connections get their turn
BUFFER_STALL_S = 5.0                   # under pressure, a stream that wrote nothing this long is reset
WINDOW_UPDATE_BYTES = STREAM_WINDOW_BYTES // 4
LOCAL_CONNECT_TIMEOUT_S = 10           # a local service that has not accepted by then is given up
EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE
SOCKET_GONE = (ConnectionError, TimeoutError, OSError)


class EventLoop:
    """A selectors loop with timers and a thread-safe call_soon; callbacks must not
    block. With a `log`, an exception from a callback ends only the connection it
    belongs to (contain()); without one it propagates out of run(). `buffered` counts
    the bytes that wait in this loop's Streams for their local socket; past
    `buffer_budget` the Muxes that produce them stop reading (Mux.note_buffered)."""

    def __init__(self, log=None, buffer_budget=MAX_BUFFERED_BYTES, stall_s=BUFFER_STALL_S):
        self.log = log
        printable("")  # loads its codec now: out of descriptors, contain() can still log
        self.crashes = 0          # callbacks that raised, for the metrics
        self.buffered = 0
        self.buffer_budget = buffer_budget
        self.stall_s = stall_s
        self.pressed = set()      # Muxes holding their reads back for the budget
        self.holders = set()      # Muxes with bytes in `buffered`
        self.pressure_timer = None
        self.selector = selectors.DefaultSelector()
        self.timers = []
        self.timer_seq = 0
        self.soon = collections.deque()
        self.interest = {}  # socket -> (events, callback) as registered
        self.waker_r, self.waker_w = socket.socketpair()
        self.waker_r.setblocking(False)
        self.waker_w.setblocking(False)
        self.watch(self.waker_r, EVENT_READ, self.on_wake)
        self.running = False
        # Every Mux of this loop builds outgoing DATA in `scratch` and decodes
        # incoming bytes in `inbox`. They are shared because one thread runs
        # them all and no callback reads a Mux while another decodes: 512 KiB
        # per loop instead of per pod connection (and no heap churn per flap).
        # Anonymous maps: a page costs memory only once written, where
        # bytearray(n) writes all n bytes (an idle pod stays 0.5 MB smaller).
        self.scratch = mmap.mmap(-1, WRITE_CHUNK_BYTES)
        self.scratch_view = memoryview(self.scratch)
        self.inbox = mmap.mmap(-1, TLS_READ_BYTES)
        self.inbox_view = memoryview(self.inbox)

    def watch(self, sock, events, callback=None):
        """Register, change or (events=0) unregister `sock`; callback(mask) runs when it
        is ready. Called on every change of interest: a system call only when the events
        or the callback really change (bound methods compare equal)."""
        current = self.interest.get(sock)
        if current is None:
            if events:
                self.selector.register(sock, events, callback)
                self.interest[sock] = (events, callback)
        elif not events:
            self.selector.unregister(sock)
            del self.interest[sock]
        elif current != (events, callback):
            self.selector.modify(sock, events, callback)
            self.interest[sock] = (events, callback)

    def call_later(self, delay_s, callback):
        """Run callback after delay_s; returns a handle whose cancel() stops it."""
        handle = Timer(time.monotonic() + delay_s, callback)
        self.timer_seq += 1
        heapq.heappush(self.timers, (handle.when, self.timer_seq, handle))
        return handle

    def call_soon_threadsafe(self, callback):
        """From any thread: run callback in the loop thread soon."""
        self.soon.append(callback)
        try:
            self.waker_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending

    def on_wake(self, _mask):
        """Drain the waker socket; the callbacks run after the select."""
        try:
            self.waker_r.recv(4096)
        except (BlockingIOError, OSError):
            pass

    def run(self):
        """Serve until stop()."""
        self.running = True
        while self.running:
            self.run_once()

    def run_once(self):
        """One select, then the due callbacks: sockets, call_soon, timers."""
        timeout = None
        if self.soon:
            timeout = 0
        elif self.timers:
            timeout = max(0.0, self.timers[0][0] - time.monotonic())
        interest = self.interest
        for key, mask in self.selector.select(timeout):
            # An earlier callback of this batch may have closed or re-watched
            # the socket: deliver only what is still asked for, to its callback.
            current = interest.get(key.fileobj)
            if current is not None and mask & current[0]:
                try:
                    current[1](mask & current[0])
                except Exception as exc:  # noqa: BLE001 - the per-connection boundary
                    self.contain(current[1], exc)
        while self.soon:
            callback = self.soon.popleft()
            try:
                callback()
            except Exception as exc:  # noqa: BLE001
                self.contain(callback, exc)
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            handle = heapq.heappop(self.timers)[2]
            if not handle.cancelled:
                try:
                    handle.callback()
                except Exception as exc:  # noqa: BLE001
                    self.contain(handle.callback, exc)

    def contain(self, callback, exc, crash=None):
        """A callback raised: a bug, or input nobody foresaw. As socketserver does, end
        only the connection it belongs to (`crash`, by default its owner's crash()), log
        one line (the traceback at debug level), count it and serve on. Never raises,
        also in a process out of descriptors."""
        if self.log is None:
            raise exc
        self.crashes += 1
        owner = getattr(callback, "__self__", None)
        self.log.warning("internal error contained in=%s error=%s",
                         type(owner or callback).__name__,
                         printable("%s: %s" % (type(exc).__name__, exc)))
        try:  # here: the pod on a router pays for the module only after a bug
            import traceback
            self.log.debug("%s", "".join(traceback.format_exception(type(exc), exc,
                                                                    exc.__traceback__)))
        except Exception:  # noqa: BLE001 - no descriptor left for the import: no traceback
            pass
        crash = crash or getattr(owner, "crash", None)
        if crash is not None:
            try:
                crash(exc)
            except Exception as second:  # noqa: BLE001 - closing must not stop the loop
                self.log.debug("cleanup after an internal error failed: %s", printable(str(second)))

    def stop(self):
        """End run() after the current iteration; callable from any thread."""
        self.running = False
        self.call_soon_threadsafe(lambda: None)

    # -- the buffer budget ------------------------------------------------
    def press(self, mux):
        """`mux` holds its reads back; meanwhile stalled readers are reaped once a second."""
        self.pressed.add(mux)
        if self.pressure_timer is None:
            self.pressure_timer = self.call_later(1.0, self.on_pressure_tick)

    def relieve(self):
        """Let the held Muxes read again once they and the loop are below half budget."""
        if self.buffered <= self.buffer_budget // 2:
            for mux in [m for m in self.pressed if m.buffered <= m.buffer_budget // 2]:
                mux.release()

    def on_pressure_tick(self):
        """Once a second while the budget is reached: reap stalled readers, relieve."""
        self.pressure_timer = None
        if not self.pressed:
            return
        now = time.monotonic()
        for mux in list(self.holders):
            mux.reap_stalled(now, self.stall_s)
        self.relieve()
        if self.pressed:
            self.pressure_timer = self.call_later(1.0, self.on_pressure_tick)


class Timer:
    """Handle of a call_later() callback."""

    def __init__(self, when, callback):
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self):
        """Drop the callback now: what it refers to is released at once, not when due."""
        self.cancelled = True
        self.callback = None


class Stream:
    """One consumer connection carried over a Mux: its socket is read only with credit
    and an uncongested Mux, and at most STREAM_WINDOW_BYTES wait in `pending`."""

    __slots__ = ("mux", "id", "sock", "connecting", "credit", "unacked", "delivered", "pending",
                 "pending_bytes", "read_closed", "peer_eof", "write_closed", "last_active",
                 "paused", "drained_at", "closed", "target", "uncredited", "reset_reason")

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
        self.drained_at = 0.0                  # last time the local socket took pending bytes
        self.closed = False
        self.target = ""                       # the local end, named in log lines
        self.uncredited = 0                    # own bytes in `pending`, not the peer's
        self.reset_reason = None               # the peer's RESET text, once it came
        if connecting:
            mux.loop.call_later(mux.connect_timeout_s, self.on_connect_timeout)
        self.update_interest()

    def update_interest(self):
        """Watch the socket for what the stream can do now: write what waits, read with credit."""
        if self.closed:
            return
        events = 0
        if self.connecting or self.pending:
            events |= EVENT_WRITE
        if not self.connecting and not self.read_closed and self.credit > 0 and not self.paused:
            if self.mux.congested:
                self.mux.blocked.add(self)  # flush() wakes it when the Mux drains
            else:
                events |= EVENT_READ
        self.mux.loop.watch(self.sock, events, self.on_event)

    def pause_reading(self, seconds):
        """A rate cap: stop reading the local socket for `seconds`."""
        self.paused = True
        self.update_interest()
        self.mux.loop.call_later(seconds, self.resume_reading)

    def resume_reading(self):
        """Read the local socket again after pause_reading()."""
        self.paused = False
        self.update_interest()

    def on_event(self, mask):
        """Loop callback: write first, then read."""
        if mask & EVENT_WRITE:
            self.on_writable()
        if mask & EVENT_READ and not self.closed:
            self.on_readable()

    def on_readable(self):
        """Read the local socket straight into one DATA frame, within credit."""
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
        """A connect finished (or failed) or the socket has room: write what waits."""
        if self.connecting:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                return self.local_connect_failed(os.strerror(err))
            self.connecting = False
        self.flush_pending()
        if not self.closed:
            self.update_interest()

    def on_connect_timeout(self):
        """The local service did not answer within the Mux's connect_timeout_s: reset the stream."""
        if self.connecting and not self.closed:
            self.mux.log.warning("local service unavailable stream=%d target=%s error=%s",
                                 self.id, self.target or "?",
                                 "no answer within %g s" % self.mux.connect_timeout_s)
            self.abort("%s after %g s" % (RESET_CONNECT_TIMED_OUT, self.mux.connect_timeout_s))

    def local_connect_failed(self, reason):
        """The local connect failed: the owner may try another address
        (Mux.retry_local_connect swaps the socket), else the stream ends."""
        if self.mux.retry_local_connect(self, reason):
            return None
        self.mux.log.warning("local service unavailable stream=%d target=%s error=%s",
                             self.id, self.target or "?", reason)
        return self.abort("%s: %s" % (RESET_CONNECT_FAILED, reason))

    def on_reset(self, payload):
        """The peer aborted the stream: keep its reason for the owner, close."""
        self.reset_reason = bytes(payload[:512]).decode("utf-8", "replace")
        self.destroy()

    def replace_socket(self, sock, connecting):
        """Go on with another local socket (a connect to the next address)."""
        self.mux.loop.watch(self.sock, 0)
        self.sock.close()
        self.sock, self.connecting = sock, connecting
        self.update_interest()

    def send_first(self, data):
        """Bytes of our own (a PROXY protocol header) written to the local
        socket before anything from the peer; never credited back."""
        self.uncredited += len(data)
        self.keep(data)

    def on_data(self, payload):
        """A piece of DATA (a view valid only now): write it, or keep a copy."""
        self.unacked += len(payload)
        if self.unacked > STREAM_WINDOW_BYTES:
            raise ProtocolError("stream %d: data beyond the window" % self.id)
        if self.peer_eof:
            raise ProtocolError("stream %d: data after EOF" % self.id)
        self.last_active = time.monotonic()
        if self.pending:
            self.keep(payload)
            return
        try:  # even while connecting: a loopback connect is done by now, send says if not
            sent = self.sock.send(payload)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except SOCKET_GONE as exc:
            if self.connecting:
                self.keep(payload)  # for the next address, if there is one
                return self.local_connect_failed(exc.strerror or str(exc))
            return self.abort("local write failed: %s" % exc)
        if sent and self.connecting:
            self.connecting = False
            self.update_interest()
        self.count_delivered(sent)
        if sent < len(payload):
            self.keep(payload[sent:])

    def keep(self, payload):
        """Keep a copy of what the socket did not take; write it when it has room."""
        was_empty = not self.pending
        self.pending.append(bytes(payload))
        self.pending_bytes += len(payload)
        self.mux.note_buffered(len(payload))
        if was_empty:
            self.drained_at = time.monotonic()
            self.update_interest()

    def count_delivered(self, sent):
        """Bytes reached the local socket: count them, return credit in batches."""
        own = min(sent, self.uncredited)
        self.uncredited -= own
        sent -= own
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
            self.drained_at = time.monotonic()
            self.mux.note_buffered(-sent)
            self.count_delivered(sent)
            if sent < len(chunk):
                self.pending[0] = chunk[sent:]
                break
            self.pending.popleft()
        if self.peer_eof and not self.pending and not self.write_closed:
            self.shutdown_write()

    def shutdown_write(self):
        """Half-close: the peer sent EOF and everything is written."""
        self.write_closed = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except SOCKET_GONE:
            pass
        self.finish_if_done()

    def on_window(self, payload):
        """The peer returned credit; ProtocolError if it grows past the window."""
        if len(payload) != U32.size:
            raise ProtocolError("stream %d: bad WINDOW frame" % self.id)
        was_blocked = self.credit <= 0
        self.credit += U32.unpack(payload)[0]
        if self.credit > STREAM_WINDOW_BYTES:
            raise ProtocolError("stream %d: window grew past its size" % self.id)
        if was_blocked:
            self.update_interest()

    def on_eof(self):
        """The peer sends no more: half-close once what waits is written."""
        self.peer_eof = True
        if not self.connecting and not self.pending:
            self.shutdown_write()

    def finish_if_done(self):
        """Destroy the stream once both directions are closed."""
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

    def crash(self, _exc):
        """A callback of this stream raised (EventLoop.contain): reset it alone."""
        self.abort("internal error")

    def destroy(self):
        """Close the socket and forget the stream; idempotent."""
        if self.closed:
            return
        self.closed = True
        self.mux.loop.watch(self.sock, 0)
        self.sock.close()
        if self.pending_bytes:
            self.mux.note_buffered(-self.pending_bytes)
            self.pending_bytes = 0
        self.pending.clear()
        self.mux.streams.pop(self.id, None)
        self.mux.blocked.discard(self)
        self.mux.on_stream_closed(self)


class Mux:
    """The multiplexed tunnel connection on either side; `receives` is the set of frame
    types the peer may send. Owners override the hooks at the end (on_open() on the
    pod, on_control(), on_closed() ...); destroy() calls on_closed(reason) once."""

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
        self.reading_paused = False    # held back by the rate cap or the buffer budget:
        self.rate_hold = self.pressure_hold = False
        self.buffered = 0              # bytes in this Mux's Streams waiting for local sockets
        self.buffer_budget = loop.buffer_budget  # the owner may set a smaller one
        self.connect_timeout_s = LOCAL_CONNECT_TIMEOUT_S  # ... and another connect timeout
        self.scratch, self.scratch_view = loop.scratch, loop.scratch_view  # shared, see EventLoop
        self.inbox, self.inbox_view = loop.inbox, loop.inbox_view
        sock.setblocking(False)
        loop.watch(sock, EVENT_READ, self.on_event)
        loop.call_later(0, self.on_readable)  # TLS may hold bytes read during the greeting

    # -- sending -------------------------------------------------------
    def send(self, msg, stream, payload=b""):
        """Queue one frame and write what the socket takes."""
        self.queue(msg, stream, payload)
        self.flush()

    def queue(self, msg, stream, payload=b""):
        """Add a frame to `out`; the next send or flush writes it."""
        if self.closed:
            return
        self.out += FRAME_HEADER.pack(msg, stream, len(payload))
        self.out += payload
        if len(self.out) > MUX_HIGH_WATER_BYTES:
            self.congested = True

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
        """Send a stream-0 frame with obj as its JSON payload."""
        self.send(msg, 0, json.dumps(obj, separators=(",", ":")).encode())

    def flush(self):
        """Write `out` while the socket takes it; wake blocked streams below the low water mark."""
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
        """Loop callback: write first, then read unless a rate cap paused reading."""
        if mask & EVENT_WRITE:
            self.flush()
        if mask & EVENT_READ and not self.closed and not self.reading_paused:
            self.on_readable()

    def on_readable(self):
        """Up to 16 batches of what has arrived, fewer for a peer that sends
        many small frames (MUX_FRAMES_PER_TURN), so other connections get
        their turn; replies to control frames go out once per batch."""
        if self.closed or self.reading_paused:
            return
        frames = 0
        for _ in range(16):
            size, eof = self.read_batch()
            if size:
                self.last_heard = time.monotonic()
            try:
                for msg, stream, payload in self.decoder.frames(self.inbox_view[:size]):
                    frames += 1
                    self.dispatch(msg, stream, payload)
                    if self.closed:
                        return
            except ProtocolError as exc:
                return self.fail(str(exc))
            if self.out:
                self.flush()
            if eof:
                return self.destroy(eof)
            pause = self.pace(size) if self.pace and size else 0
            if pause > 0:
                return self.pause_reading(pause)
            if size < len(self.inbox) or self.reading_paused:
                return
            if frames > MUX_FRAMES_PER_TURN:
                break
        pending = getattr(self.sock, "pending", None)
        if not self.closed and not self.reading_paused and pending and pending():
            self.loop.call_later(0, self.on_readable)

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

    def pause_reading(self, seconds):
        """A rate cap: stop reading the peer for a while (writes go on)."""
        self.rate_hold = True
        self.hold_reads()
        self.loop.call_later(seconds, self.end_rate_hold)

    def end_rate_hold(self):
        """The rate cap's pause is over: read again."""
        self.rate_hold = False
        self.resume_reading()

    def hold_reads(self):
        """Stop reading the peer (writes go on) until resume_reading()."""
        self.reading_paused = True
        if not self.closed:
            self.loop.watch(self.sock, EVENT_WRITE if self.out else 0, self.on_event)

    def resume_reading(self):
        """Read the peer again after pause_reading()."""
        if self.closed or self.rate_hold or self.pressure_hold or not self.reading_paused:
            return
        self.reading_paused = False
        self.flush()
        self.on_readable()

    def dispatch(self, msg, stream_id, payload):
        """Hand one frame to its stream, to on_frame_0 or to on_open_frame."""
        if stream_id == 0:
            return self.on_frame_0(msg, payload)
        if msg == Msg.OPEN:
            return self.on_open_frame(stream_id, payload)
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.highest_stream:
                raise ProtocolError("frame for unknown stream %d" % stream_id)
            return  # frames in flight for a stream closed here are expected
        try:
            if msg == Msg.DATA:
                stream.on_data(payload)
            elif msg == Msg.WINDOW:
                stream.on_window(payload)
            elif msg == Msg.EOF:
                stream.on_eof()
            elif msg == Msg.RESET:
                stream.on_reset(payload)
            else:
                raise ProtocolError("%s is not a stream frame" % msg.name)
        except ProtocolError:
            raise
        except Exception as exc:  # noqa: BLE001 - one stream's bug ends only that stream
            self.loop.contain(stream.crash, exc)

    def on_frame_0(self, msg, payload):
        """A frame on stream 0: answer PING, ignore PONG, the rest to on_control()."""
        if msg == Msg.PING:
            if len(self.out) <= CONTROL_REPLY_LIMIT_BYTES:  # else the peer reads no replies
                self.queue(Msg.PONG, 0, payload)  # sent once per batch (on_readable)
        elif msg == Msg.PONG:
            pass  # any frame counts as a sign of life
        else:
            self.on_control(msg, decode_control(payload))

    def on_open_frame(self, stream_id, payload):
        """A new stream from the peer: check its id and port, then on_open()."""
        if stream_id <= self.highest_stream:
            raise ProtocolError("bad OPEN for stream %d" % stream_id)
        port, consumer, public = decode_open(payload)
        self.highest_stream = stream_id
        self.open_contained(stream_id, self.on_open, port, consumer, public)

    def open_contained(self, stream_id, opener, *args):
        """opener(stream_id, *args) opens the stream: anything it raises but
        ProtocolError (a bug; no descriptor left for the local socket) ends
        that stream alone (EventLoop.contain), not the connection."""
        try:
            return opener(stream_id, *args)
        except ProtocolError:
            raise
        except Exception as exc:  # noqa: BLE001 - one stream's failure ends only that stream
            return self.loop.contain(opener, exc, lambda _exc: self.reset_opened(stream_id))

    def reset_opened(self, stream_id):
        """End a stream whose opening failed, made or not yet."""
        stream = self.streams.get(stream_id)
        if stream is not None:
            return stream.abort("internal error")
        return self.send(Msg.RESET, stream_id, b"internal error")

    # -- the buffer budget ---------------------------------------------
    def note_buffered(self, delta):
        """Bytes waiting in this Mux's Streams changed by `delta`. Past this
        Mux's or the loop's budget, the peer (who produces them) is no longer
        read; the loop lets it read again below half of both (EventLoop.relieve)."""
        loop = self.loop
        was_empty = not self.buffered
        self.buffered += delta
        loop.buffered += delta
        if delta > 0:
            if was_empty:
                loop.holders.add(self)
            if not self.pressure_hold and (self.buffered > self.buffer_budget
                                           or loop.buffered > loop.buffer_budget):
                self.log.debug("reads held back, buffer budget reached buffered=%d total=%d",
                               self.buffered, loop.buffered)
                self.pressure_hold = True
                loop.press(self)
                self.hold_reads()
        else:
            if not self.buffered:
                loop.holders.discard(self)
            if loop.pressed:
                loop.relieve()

    def release(self):
        """Called by the loop, possibly inside a Stream's write: resume on a timer."""
        self.loop.pressed.discard(self)
        self.pressure_hold = False
        self.loop.call_later(0, self.resume_reading)

    def reap_stalled(self, now, stall_s):
        """Under pressure: reset the streams whose local socket took nothing
        for stall_s (a reader that does not read), so the budget serves others."""
        for stream in [s for s in self.streams.values()
                       if s.pending and now - s.drained_at > stall_s]:
            self.log.info("stream reset, reader stalled under buffer pressure stream=%d bytes=%d",
                          stream.id, stream.pending_bytes)
            stream.abort("reader stalled for %g s while the buffer budget was used up" % stall_s)

    # -- streams -------------------------------------------------------
    def add_stream(self, stream_id, sock, connecting=False):
        """Carry `sock` as stream `stream_id` over this connection."""
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
        if self.reading_paused:  # we are not listening: its silence says nothing
            self.last_heard = time.monotonic()
        silent = time.monotonic() - self.last_heard
        if silent >= 3 * self.heartbeat_s:
            return self.destroy("peer silent for %.1f s" % silent)
        self.send(Msg.PING, 0, U32.pack(int(silent)))
        next_check = min(self.heartbeat_s, 3 * self.heartbeat_s - silent)
        self.heartbeat = self.loop.call_later(max(next_check, 0.01), self.on_heartbeat)

    def fail(self, reason):
        """The peer broke the protocol: say why, then close."""
        self.log.warning("protocol error: %s", reason)
        self.send_control(Msg.GOAWAY, {"reason": reason})
        self.destroy("protocol error: %s" % reason)

    def crash(self, exc):
        """A callback of the connection raised (EventLoop.contain): close it."""
        self.destroy("internal error (%s)" % type(exc).__name__)

    def destroy(self, reason):
        """Close every stream and the connection; buffers are released at once."""
        if self.closed:
            return
        self.closed = True
        self.heartbeat.cancel()
        for stream in list(self.streams.values()):
            stream.destroy()
        self.loop.pressed.discard(self)
        self.loop.holders.discard(self)
        self.out = bytearray()
        self.decoder.buffer = bytearray()
        self.loop.watch(self.sock, 0)
        try:
            self.sock.close()
        except OSError:
            pass
        self.on_closed(reason)

    # -- for owners to override ----------------------------------------
    def on_open(self, stream_id, port, consumer=None, public=None):
        """May be overridden: the peer opened stream_id for its `port` service."""
        raise ProtocolError("OPEN is not expected here")

    def retry_local_connect(self, stream, reason):
        """A local connect failed; True when the owner goes on with another
        address (Stream.replace_socket), False to end the stream."""
        return False

    def on_control(self, msg, obj):
        """May be overridden: a control frame other than PING/PONG arrived."""
        raise ProtocolError("unexpected %s" % msg.name)

    def on_stream_closed(self, stream):
        """May be overridden: `stream` was destroyed."""

    def on_closed(self, reason):
        """May be overridden: the connection is closed, for `reason`."""
# ---- END SHARED relay ----
# ---- BEGIN SHARED process (identical in pipe2me_server.py and pipe2me_pod.py) ----
# How the long-running commands start: as many descriptors as allowed, the
# compiled code handed to a fresh interpreter (used by main() only), the service
# definitions that start them at boot (`service`) and the lock on the pid file.

def raise_open_file_limit():
    """Let the relay hold as many sockets as allowed: soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# Python keeps, for the life of a process, most of the memory its compiler
# took for the script the process started with: about 8 MB for the pod and
# 11 MB for the server on Python 3.11. The server and `start` run for months,
# so they re-execute themselves once, keeping their PID, from the script's
# compiled code handed over in an anonymous in-memory file, with -S: both
# scripts use the standard library only, so nothing from site-packages
# belongs in the process.
CODE_FD_VARIABLE = "PIPE2ME_CODE_FD"
CODE_LOADER = ("import marshal,os,sys;"
               "code=marshal.load(os.fdopen(int(os.environ.pop('PIPE2ME_CODE_FD')),'rb'));"
               "del sys.argv[0];"
               "exec(code,{'__name__':'__main__','__file__':sys.argv[0],'__cached__':'memfd'})")


# glibc raises its mmap threshold to the size of any large block freed; from
# then on such blocks come from the heap, which fragments and does not shrink,
# so the bytes held for a crowd of slow readers would stay in RSS after they
# left. A fixed threshold keeps every block of 64 KiB or more (the relay's
# buffers) in a map of its own, returned to the system when freed.
MALLOC_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def script_code(path):
    """The code this process runs as its script, as compiled at start (found
    on the stack), else `path` compiled anew (70 ms more for the server)."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is globals():
            return frame.f_code
        frame = frame.f_back
    with open(path, "rb") as fh:
        return compile(fh.read(), path, "exec", dont_inherit=True)


def run_from_compiled_code(environment=None):
    """Re-execute this script from its compiled code (see above), with the
    `environment` variables added. Returns only when that is done already,
    not wanted (imported, run with -m, under a debugger, profiler or
    coverage tool) or not possible."""
    script = globals()
    path = script.get("__file__")
    if (script.get("__name__") != "__main__" or script.get("__cached__") or not path
            or sys.gettrace() or sys.getprofile()
            or not sys.executable or not hasattr(os, "memfd_create")):
        return
    try:
        code = script_code(path)
        fd = os.memfd_create("pipe2me-code", 0)
    except (OSError, SyntaxError, ValueError):
        return
    try:
        with open(fd, "wb", closefd=False) as fh:
            marshal.dump(code, fh)
        os.lseek(fd, 0, os.SEEK_SET)
        os.set_inheritable(fd, True)
        flags = ["-W" + option for option in sys.warnoptions] + ["-O"] * sys.flags.optimize
        for name, value in getattr(sys, "_xoptions", {}).items():
            flags += ["-X", name if value is True else "%s=%s" % (name, value)]
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        environment = dict({k: v for k, v in MALLOC_ENVIRONMENT.items() if k not in os.environ},
                           **(environment or {}), **{CODE_FD_VARIABLE: str(fd)})
        os.environ.update(environment)
        os.execv(sys.executable, [sys.executable, "-S"] + flags + ["-c", CODE_LOADER, path]
                 + sys.argv[1:])
    except OSError:
        for name in environment or ():
            os.environ.pop(name, None)
        os.close(fd)


SERVICE_RESTART_DELAY_S = 5          # between a failed run and the next

def systemd_quote(word):
    """One ExecStart word: `%` and `$` escaped, double-quoted when needed."""
    word = word.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


# The verbs of a System V init script, after its own supervise(): a pid file,
# a stop that waits for the process, start/stop/status and @MORE_VERBS@.
SYSV_VERBS_TEMPLATE = """\
is_running() {
	[ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

do_stop() {
	if is_running; then
		kill "$(cat "$PIDFILE")"
		i=0
		while is_running && [ "$i" -lt @STOP_WAIT_S@ ]; do sleep 1; i=$((i + 1)); done
	fi
	rm -f "$PIDFILE"
}

case "$1" in
start)
	if is_running; then echo "@NAME@ is already running"; exit 0; fi
	(exec </dev/null >>"$LOGFILE" 2>&1; supervise) &  # exec: no copy of our stdout stays open
	echo $! >"$PIDFILE"
	;;
stop)
	do_stop
	;;
@MORE_VERBS@status)
	if is_running; then echo "@NAME@ is running"; else echo "@NAME@ is stopped"; exit 3; fi
	;;
*)
	echo "usage: $0 @USAGE@" >&2
	exit 2
	;;
esac
"""


def sysv_verbs(name, stop_wait_s, more_verbs, usage):
    """The end of an init script for the service `name`: its verbs, `more_verbs`
    (case branches, each ending in `;;`) before status; `usage` lists them all."""
    return (SYSV_VERBS_TEMPLATE.replace("@MORE_VERBS@", more_verbs).replace("@NAME@", name)
            .replace("@STOP_WAIT_S@", str(stop_wait_s)).replace("@USAGE@", usage))


def lock_pid_file(path, mode):
    """Hold an exclusive lock on `path` (created with `mode`), our PID written in it,
    for the life of the process: the open descriptor, or None when another process
    holds it (lock_holder_pid() names it). OSError if it cannot be opened."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, b"%d\n" % os.getpid())
    return fd


def lock_holder_pid(path):
    """The PID in `path` of the process that holds its lock, or None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it
    except OSError:
        text = os.read(fd, 32).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    finally:
        os.close(fd)
# ---- END SHARED process ----


# =====================================================================
# POD FILES — owns the files of DIR (SPEC §3): settings, key, CSR, certificates and their dates
# =====================================================================

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class PodFiles:
    """The paths of one pod directory: info, local, key, cert, tunnel cert, cacert.

    The tunnel cert appears with the first ACME chain; until then (and with
    ACME off) the cert serves both the tunnel connection and the services."""

    def __init__(self, directory):
        self.dir = os.path.abspath(directory)
        self.info, self.local, self.key, self.cert, self.tunnel_cert, self.cacert = self.all()

    def all(self):
        """The paths of the six files, in POD_FILES order."""
        return [os.path.join(self.dir, name) for name in POD_FILES]

    def tunnel_cert_in_use(self):
        """The server-CA certificate the tunnel connection authenticates with."""
        return self.tunnel_cert if os.path.exists(self.tunnel_cert) else self.cert

    def existing(self):
        """The files of a setup that are present, as paths."""
        return [path for path in self.all() if os.path.lexists(path)]

    def remove_all(self):
        """Remove the files of the setup; the names of those that were there."""
        return [os.path.basename(path) for path in self.all() if remove_file(path)]


class LocalTarget:
    """Where the pod connects for one service: `PORT` (this machine: 127.0.0.1,
    then ::1), `HOST:PORT`, `[IPV6]:PORT` or `NAME:PORT`. Names are resolved
    at each connect, and every address is tried in turn."""

    def __init__(self, host, port):
        self.host, self.port = host, port

    def __str__(self):
        if self.host is None:
            return str(self.port)
        return "%s:%d" % ("[%s]" % self.host if ":" in self.host else self.host, self.port)

    def needs_lookup(self):
        """Whether addresses() asks the resolver: a name, not a bare PORT or an address."""
        if self.host is None:
            return False
        try:
            ipaddress.ip_address(self.host)
            return False
        except ValueError:
            return True

    def addresses(self):
        """[(family, sockaddr), ...] to try in order; OSError when a name does
        not resolve. `localhost` is both loopbacks even where /etc/hosts
        names only one (RFC 6761), so a service bound to ::1 only is found."""
        loopbacks = [(socket.AF_INET, ("127.0.0.1", self.port)),
                     (socket.AF_INET6, ("::1", self.port, 0, 0))]
        if self.host is None:
            return loopbacks
        found = []
        for family, _type, _proto, _name, sockaddr in socket.getaddrinfo(
                self.host, self.port, 0, socket.SOCK_STREAM):
            if (family, sockaddr) not in found and family in (socket.AF_INET, socket.AF_INET6):
                found.append((family, sockaddr))
        if self.host.lower().rstrip(".") == "localhost":
            found += [address for address in loopbacks if address not in found]
        return found


# One published service: protocol, public port on the server, local target (and its port).
Service = collections.namedtuple("Service", "protocol public_port target local_port")


class PodSetup:
    """The settings of a pod, read from pipe2me.info.inc and pipe2me.local.inc."""

    def __init__(self, files, info, local):
        self.files = files
        self.server = local["PIPE2ME_SERVER"]
        self.local_ports = parse_targets(local["PIPE2ME_LOCAL_PORTS"], LOCAL_FILE)
        self.proxy_protocol = info.get("PIPE2ME_PROXY_PROTOCOL") or "off"
        self.id = info["PIPE2ME_ID"]
        self.fqdn = info["PIPE2ME_FQDN"]
        self.urls = numbered(info, "PIPE2ME_URLS")
        self.tunnel = info["PIPE2ME_TUNNEL"]
        self.tunnel_domain = info.get("PIPE2ME_TUNNEL_DOMAIN", "")
        self.expires_at = int_or_none(info.get("PIPE2ME_EXPIRES_AT"))
        self.secret = info["PIPE2ME_SECRET"]

    def services(self):
        """Services from the URLs (`<protocol>://<fqdn>:<port>`) and local ports, in order."""
        urls = [urllib.parse.urlsplit(url) for url in self.urls]
        return [Service(url.scheme, url.port, target, target.port)
                for url, target in zip(urls, self.local_ports)]


def numbered(values, prefix):
    """The values of prefix_0, prefix_1, ... in `values`, up to the first gap."""
    items, index = [], 0
    while "%s_%d" % (prefix, index) in values:
        items.append(values["%s_%d" % (prefix, index)])
        index += 1
    return items


def int_or_none(text):
    """int(text), or None when it is no number."""
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


TARGET_PATTERN = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]:|([A-Za-z0-9._-]+):)?([0-9]{1,5})$")


def parse_targets(text, where):
    """A comma list of local targets (PORT, HOST:PORT, [IPV6]:PORT, NAME:PORT)
    as LocalTargets; UsageError naming `where`."""
    targets = []
    for item in str(text).split(","):
        item = item.strip()
        match = TARGET_PATTERN.match(item)
        host = match and (match.group(1) or match.group(2))
        if not match or not 1 <= int(match.group(3)) <= 65535 or (
                host and not valid_host(host, bool(match.group(1)))):
            raise UsageError("%s: bad port %r: expected PORT, HOST:PORT, [IPV6]:PORT "
                             "or NAME:PORT (port 1..65535), separated by commas" % (where, item))
        targets.append(LocalTarget(host or None, int(match.group(3))))
    return targets


def valid_host(host, bracketed):
    """A local target's or the server's host: an IPv6 address if it came in
    brackets, else a host name (an IPv4 address is one; '_' and a final dot allowed)."""
    if bracketed:
        try:
            return ipaddress.ip_address(host).version == 6
        except ValueError:
            return False
    return is_hostname(host[:-1] if host.endswith(".") else host, underscores=True)


def read_setup(files):
    """The PodSetup of `files.dir`; UsageError when there is none or it is damaged."""
    info_text, local_text = read_text(files.info), read_text(files.local)
    if info_text is None or local_text is None:
        missing = INFO_FILE if info_text is None else LOCAL_FILE
        raise UsageError("no setup in %s (%s missing): run `setup --server URL --auth TOKEN` first"
                         % (files.dir, missing))
    info = parse_inc(info_text, files.info)
    local = parse_inc(local_text, files.local)
    for path, values, keys in ((files.info, info, ("PIPE2ME_ID", "PIPE2ME_FQDN", "PIPE2ME_TUNNEL",
                                                   "PIPE2ME_SECRET", "PIPE2ME_URLS_0")),
                               (files.local, local, ("PIPE2ME_SERVER", "PIPE2ME_LOCAL_PORTS"))):
        for key in keys:
            if not values.get(key):
                raise UsageError("%s lacks %s: the setup is damaged; run `clear` and `setup` again"
                                 % (path, key))
    if not ID_PATTERN.match(info["PIPE2ME_ID"]):
        raise UsageError("%s: bad PIPE2ME_ID %r" % (files.info, info["PIPE2ME_ID"]))
    return PodSetup(files, info, local)


def tunnel_endpoint(server_url, tunnel_port):
    """`host:port` where the pod connects: the server's host with the tunnel port."""
    host = urllib.parse.urlsplit(server_url).hostname
    return "%s:%d" % ("[%s]" % host if ":" in host else host, tunnel_port)


def write_info(files, server_url, tunnel, secret):
    """Write pipe2me.info.inc (mode 0600: it holds the secret) from a tunnel object."""
    values = {"PIPE2ME_ID": tunnel["id"], "PIPE2ME_FQDN": tunnel["fqdn"]}
    values.update(("PIPE2ME_URLS_%d" % index, url) for index, url in enumerate(tunnel["urls"]))
    values["PIPE2ME_TUNNEL"] = tunnel_endpoint(server_url, tunnel["tunnel_port"])
    values["PIPE2ME_TUNNEL_DOMAIN"] = tunnel.get("tunnel_domain", "")
    values["PIPE2ME_EXPIRES_AT"] = tunnel["expires_at"]
    values["PIPE2ME_PROXY_PROTOCOL"] = tunnel.get("proxy_protocol") or "off"
    values["PIPE2ME_SECRET"] = secret
    write_file_atomic(files.info, format_inc(values, "pipe2me tunnel settings from the server"),
                      SECRET_FILE_MODE)


def write_local(files, server_url, local_ports):
    """Write pipe2me.local.inc: the server URL and the local targets."""
    values = {"PIPE2ME_SERVER": server_url,
              "PIPE2ME_LOCAL_PORTS": ",".join(str(port) for port in local_ports)}
    write_file_atomic(files.local, format_inc(values, "pipe2me settings of this pod"))


def check_tunnel(tunnel, need_secret=False):
    """Check the shape of a tunnel object from the server; return it."""
    try:
        ok = (ID_PATTERN.match(tunnel["id"]) and is_hostname(tunnel["fqdn"]) and "." in tunnel["fqdn"]
              and len(tunnel["urls"]) == len(tunnel["ports"]) == len(tunnel["protocols"]) > 0
              and all(isinstance(url, str) and urllib.parse.urlsplit(url).port for url in tunnel["urls"])
              and all(str(text).isprintable() for text in tunnel["urls"] + [  # one line each in the .inc
                  tunnel.get(key, "") for key in ("tunnel_domain", "proxy_protocol", "secret")])
              and all(type(p) is int and 0 < p < 65536 for p in tunnel["ports"] + [tunnel["tunnel_port"]])
              and isinstance(tunnel["expires_at"], int)
              and (not need_secret or isinstance(tunnel["secret"], str) and tunnel["secret"]))
    except (KeyError, TypeError, ValueError):  # ValueError: a URL's port out of range
        ok = False
    if not ok:
        raise Rejected("bad tunnel object from the server: is it a pipe2me server of protocol %d?"
                       % PROTOCOL_VERSION)
    return tunnel


def make_key():
    """A new EC P-256 private key as PEM bytes."""
    return run_openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"])


def make_csr(key_path, fqdn):
    """A CSR for `fqdn` (subject and SAN, as ACME CAs want) signed with the key at `key_path`, as PEM text."""
    return run_openssl(["req", "-new", "-key", key_path, "-subj", "/CN=" + fqdn,
                        "-addext", "subjectAltName=DNS:" + fqdn]).decode("ascii")


def restore_tunnel_cert(files, acme_not_after):
    """After the last ACME chain expired unrenewed, give the services the
    server-CA certificate again; True when pipe2me.openssl.cert changed."""
    tunnel_cert = read_text(files.tunnel_cert)
    if not tunnel_cert or not isinstance(acme_not_after, int):
        return False
    if acme_not_after > time.time() or read_text(files.cert) == tunnel_cert:
        return False
    write_file_atomic(files.cert, tunnel_cert)
    log.warning("acme certificate expired, server-CA certificate back in use")
    return True


def install_chain(files, chain):
    """Put a publicly trusted chain (leaf first) in pipe2me.openssl.cert, atomically,
    if it is new and belongs to the pod's key; True when the file changed.

    A directory from before ACME first keeps its server-CA certificate as
    the tunnel cert, so the tunnel connection goes on authenticating."""
    if not (isinstance(chain, str) and chain.isascii()  # PEM; a lone surrogate has no UTF-8
            and chain.startswith("-----BEGIN CERTIFICATE-----")):
        return False
    current = read_text(files.cert)
    if current == chain:
        return False
    if not os.path.exists(files.tunnel_cert) and current:
        write_file_atomic(files.tunnel_cert, current)
    candidate = files.cert + ".new"
    write_file_atomic(candidate, chain)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(candidate, files.key)
    except (ssl.SSLError, OSError) as exc:
        remove_file(candidate)
        log.warning("acme certificate refused: it does not fit the key reason=%s", exc)
        return False
    os.replace(candidate, files.cert)
    return True


def take_acme(files, acme):
    """Install the ACME chain of the server's `acme` state (without one, the
    server-CA certificate is back once the last chain has ended) and log the
    state; True when pipe2me.openssl.cert changed."""
    changed = (install_chain(files, acme.get("chain")) or not acme.get("chain")
               and restore_tunnel_cert(files, acme.get("not_after")))
    if changed:
        log.info("acme certificate installed not_after=%s", acme.get("not_after"))
    elif acme.get("state") != "valid":
        log.info("acme certificate not issued state=%s reason=%s next_try_at=%s", acme.get("state"),
                 str(acme.get("reason"))[:300], acme.get("next_try_at"))
    return changed


def cert_validity(cert_path):
    """(not_before, not_after) of a PEM certificate, in epoch seconds."""
    text = run_openssl(["x509", "-noout", "-startdate", "-enddate", "-in", cert_path])
    dates = dict(line.split("=", 1) for line in text.decode("ascii").splitlines() if "=" in line)
    try:
        return (ssl.cert_time_to_seconds(dates["notBefore"].strip()),
                ssl.cert_time_to_seconds(dates["notAfter"].strip()))
    except (KeyError, ValueError):
        raise Pipe2meError("cannot read the validity of %s" % cert_path)


def cert_needs_renewal(cert_path, now=None):
    """True when the certificate is missing, unreadable, or expires soon."""
    if not os.path.exists(cert_path):
        return True
    try:
        not_before, not_after = cert_validity(cert_path)
    except Pipe2meError as exc:
        log.warning("certificate unreadable, renewing path=%s reason=%s", cert_path, exc)
        return True
    remaining = not_after - (time.time() if now is None else now)
    return remaining < (not_after - not_before) * CERT_RENEW_REMAINING_FRACTION


# =====================================================================
# SERVER API CLIENT — HTTP(S) JSON calls to the server; used by COMMANDS
# =====================================================================


def normalize_server_url(text):
    """`http(s)://host[:port][/path]` from a URL or a bare `host[:port]` (meaning https)."""
    original = (text or "").strip()
    if not original:
        raise UsageError("missing server: pass --server URL")
    text = original
    if "://" not in text:
        if text.count(":") > 1 and not text.startswith("["):
            text = "[%s]" % text  # a bare IPv6 address
        text = "https://" + text
    try:
        parts = urllib.parse.urlsplit(text)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise UsageError("bad server URL %r: %s" % (original, exc))
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UsageError("bad server URL %r: use http:// or https://" % original)
    if not host or not valid_host(host, ":" in host) or port == 0 or parts.query or parts.fragment \
            or parts.username is not None:
        raise UsageError("bad server URL %r: expected http(s)://HOST[:PORT] or HOST[:PORT]"
                         % original)
    netloc = "[%s]" % host if ":" in host else host
    if port is not None:
        netloc += ":%d" % port
    return "%s://%s%s" % (scheme, netloc, parts.path.rstrip("/"))


def make_ssl_context(cafile=None, insecure=False):
    """TLS settings for the API: `cafile` if given, no checks if `insecure`, else the system store."""
    if insecure and not cafile:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError("cannot load CA certificates from %s: %s" % (cafile, error_text(exc)))


def pinned_ssl_context(files):
    """TLS settings for the API after setup: the CA received at setup, and the
    system store for a server whose name has a publicly trusted (ACME)
    certificate. The tunnel connection trusts the pinned CA alone."""
    if not os.path.exists(files.cacert):
        raise UsageError("%s missing: the setup is damaged; run `clear` and `setup` again"
                         % files.cacert)
    context = make_ssl_context(cafile=files.cacert)
    context.load_default_certs()
    return context


class Busy(Unavailable):
    """A 429 that asks to retry within retry_after_s seconds."""

    def __init__(self, message, retry_after_s):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ApiClient:
    """Calls to the server's JSON API under `base_url`. Every failure is a
    Pipe2meError: Unavailable when the server cannot be reached or answers
    5xx, Rejected with the server's message on 4xx. `pinned` (the CA of the
    setup is trusted) only changes the hint given on certificate errors."""

    def __init__(self, base_url, ssl_context=None, secret=None, pinned=False):
        self.base_url = base_url
        self.ssl_context = ssl_context if base_url.startswith("https:") else None
        self.secret, self.pinned = secret, pinned
        self.timeout_s = API_TIMEOUT_S

    def call(self, method, path, body=None, auth=False, answers=()):
        """(status, raw bytes) of `method path`; 2xx or a status in `answers`, else
        raises. A 429 asking to retry within API_BUSY_MAX_WAIT_S (the server's
        share of API workers per address is busy, e.g. many pods behind one NAT
        set up at once) is tried again after that wait plus a random part."""
        for attempt in range(API_BUSY_RETRIES + 1):
            try:
                return self.call_once(method, path, body, auth, answers)
            except Busy as exc:
                if attempt == API_BUSY_RETRIES:
                    raise
                wait_s = exc.retry_after_s + random.uniform(0, 1)
                log.info("server busy, retrying in %.1f s path=%s", wait_s, path)
                time.sleep(wait_s)
        raise AssertionError("the loop returns or raises")

    def call_once(self, method, path, body, auth, answers):
        """One try of `call`; Busy for a 429 worth retrying soon."""
        # Imported here, not at the top: `start` never needs them, and on a
        # router they would cost 3 MB of memory for the life of the tunnel.
        import http.client
        import urllib.error
        import urllib.request
        request = urllib.request.Request(self.base_url + path, method=method)
        request.add_header("User-Agent", "pipe2me-pod/" + VERSION)
        request.add_header("Accept", "application/json")
        if body is not None:
            request.data = json.dumps(body).encode("utf-8")
            request.add_header("Content-Type", "application/json")
        if auth:
            request.add_header("Authorization", "Bearer " + self.secret)
        log.debug("api request method=%s path=%s", method, path)
        try:
            status, headers, data = http_exchange(request, self.timeout_s, API_MAX_ANSWER_BYTES,
                                                  context=self.ssl_context)
        except urllib.error.URLError as exc:
            raise self.connect_error(exc.reason)
        except (OSError, ValueError, http.client.HTTPException) as exc:  # timeouts, resets
            raise self.connect_error(exc)
        if 200 <= status < 300 or status in answers:
            return status, data
        error = self.http_error(status, data)
        wait_s = retry_after_seconds(headers.get("Retry-After")) if status == 429 else None
        if wait_s is not None and wait_s <= API_BUSY_MAX_WAIT_S:
            raise Busy(str(error), wait_s)
        raise error

    def call_json(self, method, path, body=None, auth=False, answers=()):
        """(status, decoded JSON object) of a call."""
        status, data = self.call(method, path, body, auth, answers)
        decoded = json_object(data)
        if decoded is None:
            raise Rejected("bad answer from %s%s: not a JSON object; is this a pipe2me server?"
                           % (self.base_url, path))
        return status, decoded

    def http_error(self, code, data):
        """The error for an HTTP error answer: Rejected for 4xx but 429, Unavailable otherwise."""
        message = error_message(data) or "HTTP %d" % code
        if 400 <= code < 500 and code != 429:    # 429: too often, worth retrying later
            return Rejected(message)
        return Unavailable("server error: %s: HTTP %d: %s" % (self.base_url, code, message))

    def connect_error(self, reason):
        """The error for a failed connection: Rejected for an untrusted certificate, else
        Unavailable."""
        if isinstance(reason, ssl.SSLCertVerificationError):
            hint = "" if self.pinned else "; pass --cacert FILE, or -k to skip the check"
            return Rejected("server certificate not trusted: %s: %s%s"
                            % (self.base_url, str(reason.verify_message or reason).rstrip("."),
                               hint))
        if isinstance(reason, (TimeoutError, socket.timeout)):
            text = "timed out after %d s" % self.timeout_s
        else:
            text = error_text(reason) if isinstance(reason, BaseException) else str(reason)
        return Unavailable("server unreachable: %s: %s" % (self.base_url, text))

    # -- the endpoints --------------------------------------------------

    def get_config(self):
        """GET /config."""
        return self.call_json("GET", "/config")[1]

    def create_tunnel(self, token, protocols, proxy_protocol=None):
        """POST /tunnels: the new tunnel, with its secret, checked."""
        body = {"token": token, "protocols": protocols}
        if proxy_protocol:
            body["proxy_protocol"] = proxy_protocol
        answer = self.call_json("POST", "/tunnels", body)[1]
        return check_tunnel(answer, need_secret=True)

    def tunnel_call(self, method, path, body=None):
        """The tunnel object, checked, that `method /tunnels/<path>` answers with the secret."""
        return check_tunnel(self.call_json(method, "/tunnels/" + path, body, auth=True)[1])

    def change(self, tunnel_id, **settings):
        """Change a tunnel's settings (PATCH /tunnels/ID); the tunnel."""
        return self.tunnel_call("PATCH", tunnel_id, settings)

    def get_tunnel(self, tunnel_id):
        """GET /tunnels/<id>, checked."""
        return self.tunnel_call("GET", tunnel_id)

    def verify(self, tunnel_id):
        """(status, answer) with status 200 online, 410 expired, 404 unknown."""
        return self.call_json("GET", "/tunnels/%s/verify" % tunnel_id, answers=(404, 410))

    def sign(self, tunnel_id, csr_pem):
        """POST /tunnels/<id>/cert: the certificate (PEM) for the CSR."""
        answer = self.call_json("POST", "/tunnels/%s/cert" % tunnel_id,
                                {"csr": csr_pem}, auth=True)[1]
        cert = answer.get("cert")
        if not isinstance(cert, str) or not cert.isascii() or "-----BEGIN CERTIFICATE-----" not in cert:
            raise Rejected("bad answer from %s: no certificate" % self.base_url)  # PEM is ASCII
        return cert

    def extend(self, tunnel_id, token):
        """POST /tunnels/<id>/extend with an extending token: the tunnel, checked."""
        return self.tunnel_call("POST", tunnel_id + "/extend", {"token": token})

    def delete(self, tunnel_id):
        """The HTTP status: 200 deleted, 404 unknown, 410 expired."""
        return self.call_json("DELETE", "/tunnels/" + tunnel_id, auth=True, answers=(404, 410))[0]

    def check(self, tunnel_id, body):
        """The server's reachability check of this pod's router (POST .../check)."""
        return self.call_json("POST", "/tunnels/%s/check" % tunnel_id, body, auth=True)[1]

    def get_cacert(self):
        """GET /cacert: the server's CA certificate (PEM)."""
        text = self.call("GET", "/cacert")[1].decode("utf-8", "replace")
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise Rejected("bad answer from %s/cacert: no certificate" % self.base_url)
        return text


def retry_after_seconds(value):
    """Whole seconds from a Retry-After header in delta-seconds form; None otherwise."""
    value = (value or "").strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 6 else None


def json_object(data):
    """The JSON object in the bytes `data`, or None when they hold no object."""
    try:
        decoded = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return decoded if isinstance(decoded, dict) else None


def error_message(data):
    """The server's one-line `error` from a JSON error body, if any."""
    error = (json_object(data) or {}).get("error")
    return " ".join(error.split()) if isinstance(error, str) else None


def api_for_setup(setup):
    """An ApiClient for an existing setup: the pinned CA and the tunnel's secret."""
    context = pinned_ssl_context(setup.files) if setup.server.startswith("https:") else None
    return ApiClient(setup.server, context, secret=setup.secret, pinned=True)


# =====================================================================
# ROUTER PORT MAPPING — opens the tunnel's public ports on the pod's
# home router (NAT-PMP, RFC 6886; UPnP IGD as fallback); used by the
# `map-ports` command and by `start` to keep the leases renewed
# =====================================================================
#
# Glossary: *gateway* is the pod's default router; *mapping* is one
# (internal_port, external_port) pair of TCP ports, external = the tunnel's
# public port; *lease* is how long the router keeps a mapping.
#
# NAT-PMP (RFC 6886) is a fixed 12/16-byte UDP exchange with the gateway on
# port 5351. UPnP IGD is SSDP discovery (multicast), an XML device
# description over HTTP and SOAP calls to the WANIPConnection (or
# WANPPPConnection) control URL. `PortMapper` tries NAT-PMP first and falls
# back to UPnP.

class PortMapError(Unavailable):
    """The router did not map (or unmap) a port, in one line; `code` is the
    router's NAT-PMP result code or UPnP error code, if it gave one."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


PORTMAP_LIFETIME_S = 7200          # RFC 6886 §3.3 recommends 2 hours
PORTMAP_TIMEOUT_S = 4.0            # per method; NAT-PMP sends 5 requests in that time
CHECK_ROUTER_TIMEOUT_S = 1.0       # `check` asking the router its external address
PORTMAP_METHODS = ("natpmp", "upnp", "auto")

NATPMP_PORT = 5351
NATPMP_FIRST_WAIT_S = 0.25         # RFC 6886 §3.1: 250 ms, doubling
NATPMP_MAX_REQUESTS = 9            # RFC 6886 §3.1: give up after 9 requests
NATPMP_OP_EXTERNAL_ADDRESS = 0
NATPMP_OP_MAP_TCP = 2
NATPMP_RESULTS = {
    1: "unsupported version",
    2: "not authorized or refused (port mapping is turned off on the router)",
    3: "network failure (the router has no external address yet)",
    4: "out of resources (the router's mapping table is full)",
    5: "unsupported opcode",
}

SSDP_ADDRESS = ("239.255.255.250", 1900)
SSDP_SEARCH_TARGETS = (
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
UPNP_SERVICE_TYPES = (             # in order of preference
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
UPNP_MAX_BODY_BYTES = 256 * 1024
UPNP_ERRORS = {
    402: "invalid arguments",
    501: "action failed (port forwarding disabled on the router?)",
    606: "action not authorized",
    714: "no such mapping",
    716: "wildcard not permitted in external port",
    718: "conflict in mapping entry (the port is mapped to another host)",
    724: "same port values required",
    725: "only permanent leases supported",
    728: "no port maps available",
    729: "conflict with other mechanisms",
}

UpnpService = collections.namedtuple("UpnpService", "control_url service_type location")
PortMapResult = collections.namedtuple(
    "PortMapResult", "method external_address lease_end mappings")


# ---- network facts ------------------------------------------------------

def default_gateway(route_file="/proc/net/route"):
    """The IPv4 default gateway of this network namespace (of the default
    routes, the one of lowest metric) as a dotted string, or None."""
    try:
        with open(route_file) as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    best = None
    for fields in (line.split() for line in lines):
        if len(fields) < 8 or fields[1] != "00000000" or fields[7] != "00000000":
            continue
        try:
            flags, gateway, metric = int(fields[3], 16), int(fields[2], 16), int(fields[6])
        except ValueError:
            continue
        if flags & 0x3 == 0x3 and (best is None or metric < best[0]):  # RTF_UP | RTF_GATEWAY
            best = (metric, socket.inet_ntoa(struct.pack("<L", gateway)))
    return best[1] if best else None


def local_address_toward(gateway):
    """The pod's own IPv4 address on the route to `gateway`, or PortMapError.
    Connecting a UDP socket only asks the kernel for a route: nothing is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((gateway, 9))
            return sock.getsockname()[0]
        except OSError as e:
            raise PortMapError("no route to the router %s: %s" % (gateway, e)) from None


def check_port(port):
    """port if it is a TCP port number, else ValueError."""
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError("bad TCP port %r" % (port,))
    return port


def receive_first(sock, timeout_s, parse):
    """The first parse(datagram, sender address) that is not None within
    `timeout_s`, or None; what it refuses is stray (or forged) and ignored."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            data, sender = sock.recvfrom(4096)
        except socket.timeout:
            return None
        found = parse(data, sender[0])
        if found is not None:
            return found
    return None


# ---- NAT-PMP (RFC 6886) -------------------------------------------------

def natpmp_schedule(timeout_s):
    """The waits after each NAT-PMP request: RFC 6886 §3.1's 250 ms, doubling, at
    most 9 requests, the last wait cut to fit `timeout_s`; one request at least."""
    waits, wait, left = [], NATPMP_FIRST_WAIT_S, max(float(timeout_s), 0.001)
    while left > 1e-6 and len(waits) < NATPMP_MAX_REQUESTS:
        waits.append(min(wait, left))
        left -= wait
        wait *= 2
    return waits


def natpmp_answer(data, request):
    """(result_code, data) if `data` answers `request`, else None: version 0,
    the request's opcode + 128, and a success full length that names, for a
    mapping, the same internal port."""
    if len(data) < 4 or data[0] != 0 or not data[1] & 0x80:
        return None
    result = struct.unpack("!H", data[2:4])[0]
    if result != 0:
        return result, data
    if data[1] != 0x80 | request[1]:
        return None
    if request[1] == NATPMP_OP_EXTERNAL_ADDRESS:
        return (0, data) if len(data) >= 12 else None
    return (0, data) if len(data) >= 16 and data[8:10] == request[4:6] else None


def natpmp_exchange(gateway, request, timeout_s, port):
    """The answer's bytes to `request`, sent with the RFC's retransmissions
    from a socket connected to gateway:port (no other sender is seen);
    PortMapError on silence, an ICMP error or a non-zero result code."""
    where, answer = "%s:%d" % (gateway, port), None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((gateway, port))
            for wait_s in natpmp_schedule(timeout_s):
                sock.send(request)
                answer = receive_first(sock, wait_s, lambda data, _: natpmp_answer(data, request))
                if answer is not None:
                    break
        except ConnectionRefusedError:
            raise PortMapError("no NAT-PMP service at %s (port closed)" % where) from None
        except OSError as e:
            raise PortMapError("NAT-PMP to %s failed: %s" % (where, e)) from None
    if answer is None:
        raise PortMapError("no NAT-PMP answer from %s within %.1f s" % (where, timeout_s))
    if answer[0] != 0:
        reason = NATPMP_RESULTS.get(answer[0], "unknown result")
        raise PortMapError("NAT-PMP router %s refused: %s (result %d)"
                           % (where, reason, answer[0]), answer[0])
    return answer[1]


def natpmp_external_address(gateway, timeout_s=PORTMAP_TIMEOUT_S, port=NATPMP_PORT):
    """The router's external IPv4 address as NAT-PMP tells it; PortMapError."""
    data = natpmp_exchange(gateway, struct.pack("!BB", 0, NATPMP_OP_EXTERNAL_ADDRESS),
                            timeout_s, port)
    return socket.inet_ntoa(data[8:12])


def natpmp_map(gateway, internal_port, external_port, lifetime_s,
               timeout_s=PORTMAP_TIMEOUT_S, port=NATPMP_PORT):
    """Ask for a TCP mapping; the (external_port, lifetime_s) granted, which
    the caller judges (a router may grant others). Lifetime 0 deletes the
    mapping of `internal_port` (RFC 6886 §3.4: external port 0 then). PortMapError."""
    external_port = 0 if lifetime_s == 0 else check_port(external_port)
    request = struct.pack("!BBHHHI", 0, NATPMP_OP_MAP_TCP, 0, check_port(internal_port),
                          external_port, int(lifetime_s))
    data = natpmp_exchange(gateway, request, timeout_s, port)
    return struct.unpack("!HI", data[10:16])


def natpmp_unmap(gateway, internal_port, timeout_s=PORTMAP_TIMEOUT_S, port=NATPMP_PORT):
    """Delete the TCP mapping of `internal_port` (lifetime 0). Raises PortMapError."""
    natpmp_map(gateway, internal_port, 0, 0, timeout_s, port)


# ---- UPnP IGD -----------------------------------------------------------

def ssdp_request(target, mx_s):
    """An SSDP M-SEARCH datagram for `target`."""
    return ("M-SEARCH * HTTP/1.1\r\nHOST: %s:%d\r\nMAN: \"ssdp:discover\"\r\n"
            "MX: %d\r\nST: %s\r\n\r\n" % (SSDP_ADDRESS + (mx_s, target))).encode("ascii")


def ssdp_location(data, sender):
    """Return the LOCATION of an SSDP answer if it points at its sender."""
    lines = data.decode("latin-1").split("\r\n")
    if not lines or " 200 " not in lines[0] + " ":
        return None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "location":
            url = value.strip()
            try:  # any LAN host may answer, also with a URL that does not parse
                parts = urllib.parse.urlsplit(url)
                trusted = parts.scheme == "http" and parts.hostname == sender
            except ValueError:
                trusted = False
            if trusted:  # only a description on the answering host
                return url
    return None


def ssdp_discover(local_address=None, timeout_s=PORTMAP_TIMEOUT_S):
    """The LOCATION URL of the first IGD that answers an SSDP M-SEARCH, sent
    from the interface of `local_address`, within `timeout_s`; PortMapError."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
        if local_address:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                            socket.inet_aton(local_address))
        mx_s = max(1, min(int(timeout_s), 5))
        try:
            for target in SSDP_SEARCH_TARGETS:
                sock.sendto(ssdp_request(target, mx_s), SSDP_ADDRESS)
            location = receive_first(sock, timeout_s, ssdp_location)
        except OSError as e:
            raise PortMapError("UPnP SSDP search failed: %s" % e) from None
    if location:
        return location
    raise PortMapError("no UPnP IGD answered SSDP within %.1f s" % timeout_s)


def upnp_modules():
    """(urllib.request, ElementTree), imported on first use: `start` on a router
    seldom needs them, and they would cost memory for the tunnel's life."""
    import urllib.request
    import xml.etree.ElementTree as ElementTree
    return urllib.request, ElementTree


def local_name(tag):
    """An XML tag without its namespace."""
    return tag.rsplit("}", 1)[-1]


def xml_fields(elements):
    """{tag without namespace: stripped text} of `elements` (an element: its children)."""
    return {local_name(element.tag): (element.text or "").strip() for element in elements}


def upnp_fetch(request, timeout_s, what, action=None):
    """The root element of the router's XML answer to `request` (a URL, or the
    SOAP `action`'s Request), bounded; PortMapError naming `what`. No
    *_proxy settings, no redirects (a router has no reason to redirect: a 3xx
    is a failure)."""
    request_module, ElementTree = upnp_modules()
    from http.client import HTTPException  # a bad status line, a URL it refuses: no OSError

    try:
        status, _headers, body = http_exchange(request, timeout_s, UPNP_MAX_BODY_BYTES,
                                               (request_module.ProxyHandler({}),), redirects=False)
    except (OSError, HTTPException) as e:  # urllib's URLError included
        raise PortMapError("UPnP %s failed: %s" % (what, e)) from None
    if status >= 300 and action:
        raise soap_fault(body, action)
    if status >= 300:
        raise PortMapError("UPnP %s failed: HTTP Error %d" % (what, status))
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError as e:
        raise PortMapError("UPnP %s is not XML: %s" % (what, e)) from None


def upnp_find_service(location, timeout_s=PORTMAP_TIMEOUT_S):
    """The UpnpService of the IGD described at `location`: WANIPConnection:2,
    else :1, else WANPPPConnection:1, controlled on the describing host; PortMapError."""
    root = upnp_fetch(location, timeout_s, "description " + location)
    base, found = location, {}
    for element in root.iter():
        name = local_name(element.tag)
        if name == "URLBase" and (element.text or "").strip():
            base = element.text.strip()
        elif name == "service":
            fields = xml_fields(element)
            found.setdefault(fields.get("serviceType"), fields.get("controlURL"))
    host = urllib.parse.urlsplit(location).hostname
    try:  # as for an SSDP answer: the router's XML may hold a URL that does not parse
        for service_type in UPNP_SERVICE_TYPES:
            if found.get(service_type):
                control_url = urllib.parse.urljoin(base, found[service_type])
                if urllib.parse.urlsplit(control_url).hostname != host:
                    raise PortMapError("UPnP device %s points its control URL elsewhere (%s)"
                                       % (location, control_url))
                return UpnpService(control_url, service_type, location)
    except ValueError as e:
        raise PortMapError("UPnP device %s: its control URL does not parse (%s)" % (location, e)) from None
    raise PortMapError("UPnP device %s offers no WAN connection service" % location)


def soap_envelope(service_type, action, args):
    """A SOAP request body for one UPnP action with its arguments."""
    from xml.sax.saxutils import escape  # here, not at the top: as upnp_modules()
    body = "".join("<%s>%s</%s>" % (name, escape(str(value)), name) for name, value in args)
    return ('<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"'
            ' s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
            '<u:%s xmlns:u="%s">%s</u:%s></s:Body></s:Envelope>\r\n'
            % (action, service_type, body, action)).encode("utf-8")


def soap_fault(data, action):
    """Return a PortMapError for a SOAP fault body (UPnPError inside)."""
    ElementTree = upnp_modules()[1]
    try:
        fields = xml_fields(ElementTree.fromstring(data).iter())
    except ElementTree.ParseError:
        fields = {}
    code = int_or_none(fields.get("errorCode"))
    reason = UPNP_ERRORS.get(code) or fields.get("errorDescription") or "unknown error"
    return PortMapError("UPnP %s refused by the router: %s (error %s)" % (action, reason, code),
                        code)


def upnp_call(service, action, args=(), timeout_s=PORTMAP_TIMEOUT_S):
    """The answer's fields of a SOAP action whose (name, value) `args` are in the
    order the UPnP specification lists them; PortMapError (a fault's with its code)."""
    request = upnp_modules()[0].Request(
        service.control_url, data=soap_envelope(service.service_type, action, args),
        headers={"Content-Type": 'text/xml; charset="utf-8"',
                 "SOAPAction": '"%s#%s"' % (service.service_type, action)})
    root = upnp_fetch(request, timeout_s, "%s at %s" % (action, service.control_url), action)
    for element in root.iter():
        if local_name(element.tag) == action + "Response":
            return xml_fields(element)
    raise PortMapError("UPnP %s answer lacks %sResponse" % (action, action))


def upnp_external_address(service, timeout_s=PORTMAP_TIMEOUT_S):
    """The router's external IPv4 address (GetExternalIPAddress); PortMapError
    when empty or bad. A private one is taken (a NAT behind a NAT, which
    `check` finds out), and the connection need not be "Connected"."""
    address = upnp_call(service, "GetExternalIPAddress", (), timeout_s).get(
        "NewExternalIPAddress", "")
    try:  # in its dotted form: glibc's inet_aton also takes "1.2.3.4 <anything>"
        address = socket.inet_ntoa(socket.inet_aton(address))
    except OSError:
        address = ""
    if not address or address == "0.0.0.0":
        raise PortMapError("UPnP router has no external address (%r)" % address)
    return address


def upnp_mapping_args(external_port):
    """The arguments that name a TCP mapping, first in Add- and DeletePortMapping."""
    return (("NewRemoteHost", ""), ("NewExternalPort", check_port(external_port)),
            ("NewProtocol", "TCP"))


def upnp_map(service, internal_client, internal_port, external_port, lifetime_s,
             description, timeout_s=PORTMAP_TIMEOUT_S):
    """AddPortMapping TCP external_port -> internal_client:internal_port; the
    lease granted: `lifetime_s`, or 0 (permanent) from a router that takes
    only those (error 725). PortMapError (718: another host holds the port)."""
    for lease_s in (int(lifetime_s), 0):
        try:
            upnp_call(service, "AddPortMapping", upnp_mapping_args(external_port) + (
                ("NewInternalPort", check_port(internal_port)),
                ("NewInternalClient", internal_client), ("NewEnabled", 1),
                ("NewPortMappingDescription", description), ("NewLeaseDuration", lease_s),
            ), timeout_s)
            return lease_s
        except PortMapError as e:
            if e.code != 725 or lease_s == 0:
                raise
    raise AssertionError("the loop returns or raises")


def upnp_unmap(service, external_port, timeout_s=PORTMAP_TIMEOUT_S):
    """DeletePortMapping TCP `external_port`; one already gone is fine. PortMapError."""
    try:
        upnp_call(service, "DeletePortMapping", upnp_mapping_args(external_port), timeout_s)
    except PortMapError as e:
        if e.code != 714:
            raise


# ---- the pod's view -----------------------------------------------------

def result_of_state(state):
    """The PortMapResult in a saved state; KeyError, TypeError or ValueError if damaged."""
    pairs = [(check_port(internal), check_port(external)) for internal, external in state["mappings"]]
    return PortMapResult(state["used"], state["external_address"], float(state["lease_end"]), pairs)


class PortMapper:
    """Keeps a tunnel's public ports open on the pod's router: map_all(), again
    when renew_due() (half the lease, as RFC 6886 §3.3 advises), unmap_all().
    Blocking, not thread-safe; the settings are class attributes an instance
    may override."""

    timeout_s = PORTMAP_TIMEOUT_S
    natpmp_port = NATPMP_PORT

    def __init__(self, fqdn, gateway=None, method="auto", timeout_s=None, clock=time.time):
        if method not in PORTMAP_METHODS:
            raise ValueError("method must be one of %s" % ", ".join(PORTMAP_METHODS))
        self.fqdn, self.gateway, self.method, self.clock = fqdn, gateway, method, clock
        if timeout_s is not None:
            self.timeout_s = timeout_s
        self.result = None          # PortMapResult of the last success
        self.renew_at = None
        self.upnp = None            # UpnpService once discovered

    def find_gateway(self):
        """The IPv4 default gateway (found once), or PortMapError."""
        if self.gateway is None:
            self.gateway = default_gateway()
        if self.gateway is None:
            raise PortMapError("no IPv4 default gateway: is this pod behind a router?")
        return self.gateway

    def upnp_service(self):
        """The router's UPnP IGD service, discovered once (SSDP, then its description)."""
        if self.upnp is None:
            location = ssdp_discover(local_address_toward(self.find_gateway()), self.timeout_s)
            self.upnp = upnp_find_service(location, self.timeout_s)
        return self.upnp

    def methods(self):
        """The methods to try, the last one that worked first."""
        if self.method != "auto":
            return [self.method]
        first = self.result.method if self.result else "natpmp"
        return [first] + [m for m in ("natpmp", "upnp") if m != first]

    def map_all(self, mappings, lifetime_s=PORTMAP_LIFETIME_S):
        """Map all (internal_port, external_port) pairs with one method, all or
        nothing; again: renew, and remove the last call's pairs missing now. A
        router that grants another external port fails the method: DNS points
        at the tunnel's public port. The PortMapResult, its lease_end that of
        the shortest lease (a permanent UPnP one counts as `lifetime_s`);
        PortMapError naming each method's failure, the last mappings kept."""
        mappings = [(check_port(i), check_port(e)) for i, e in mappings]
        self.find_gateway()
        failures = []
        for method in self.methods():
            try:
                result = self.map_with(method, mappings, lifetime_s)
            except PortMapError as e:
                log.info("port mapping failed method=%s error=%s", method, e)
                failures.append("%s: %s" % ("NAT-PMP" if method == "natpmp" else "UPnP", e))
                if method == "upnp":
                    self.upnp = None   # the router may have moved its control URL: rediscover
                continue
            if self.result:
                self.unmap_quietly(self.result.method,
                                   [m for m in self.result.mappings if m not in mappings])
            self.result = result
            self.renew_at = self.clock() + (result.lease_end - self.clock()) / 2
            return result
        raise PortMapError("router port mapping failed: " + "; ".join(failures))

    def map_with(self, method, mappings, lifetime_s):
        """Map every pair with one method, all or nothing; the PortMapResult."""
        now, done, leases = self.clock(), [], []
        try:
            if method == "natpmp":
                address = natpmp_external_address(self.gateway, self.timeout_s, self.natpmp_port)
            else:
                address = upnp_external_address(self.upnp_service(), self.timeout_s)
            for internal, external in mappings:
                got, lease_s = self.map_one(method, internal, external, lifetime_s)
                done.append((internal, got))
                if got != external:
                    raise PortMapError("router mapped internal port %d to external port %d, not %d"
                                       " (port taken on the router?)" % (internal, got, external))
                leases.append(lease_s or lifetime_s)
                log.info("port mapped method=%s port=%d internal_port=%d lease_s=%d",
                         method, external, internal, lease_s)
        except PortMapError:
            self.unmap_quietly(method, done)
            raise
        return PortMapResult(method, address, now + min(leases or [lifetime_s]), list(mappings))

    def map_one(self, method, internal, external, lifetime_s):
        """Map one pair; the (external port, lease in seconds) granted."""
        if method == "natpmp":
            return natpmp_map(self.gateway, internal, external, lifetime_s, self.timeout_s,
                              self.natpmp_port)
        return external, upnp_map(self.upnp_service(), local_address_toward(self.gateway),
                                  internal, external, lifetime_s, "pipe2me %s" % self.fqdn,
                                  self.timeout_s)

    def unmap_quietly(self, method, mappings):
        """Remove mappings with the method that made them, each tried; the
        router's refusals are logged (the leases end by themselves anyway)."""
        for internal, external in mappings:
            try:
                if method == "natpmp":
                    natpmp_unmap(self.find_gateway(), internal, self.timeout_s, self.natpmp_port)
                else:
                    upnp_unmap(self.upnp_service(), external, self.timeout_s)
                log.info("port unmapped method=%s port=%d", method, external)
            except PortMapError as e:
                log.warning("port unmapping failed method=%s port=%d error=%s", method, external, e)

    def unmap_all(self):
        """Remove every mapping of the last map_all(); idempotent."""
        result, self.result, self.renew_at = self.result, None, None
        if result is not None:
            self.unmap_quietly(result.method, result.mappings)

    def renew_due(self, now=None):
        """True when a mapping exists and half its lease has passed."""
        if self.renew_at is None:
            return False
        return (self.clock() if now is None else now) >= self.renew_at

    def state(self):
        """The last result as JSON-ready data (what pipe2me.portmap.json holds)."""
        result = self.result
        return {"version": 1, "fqdn": self.fqdn, "method": self.method, "gateway": self.gateway,
                "used": result.method, "external_address": result.external_address,
                "lease_end": int(result.lease_end), "mappings": [list(p) for p in result.mappings],
                "upnp": list(self.upnp) if self.upnp and result.method == "upnp" else None}

    @classmethod
    def from_state(cls, state, same_gateway=True, **kwargs):
        """A mapper that holds the mappings of `state()`: unmap_all removes
        them, map_all renews them. same_gateway=False finds the gateway again."""
        mapper = cls(state["fqdn"], state["gateway"] if same_gateway else None,
                     state.get("method", "auto"), **kwargs)
        mapper.result = result_of_state(state)
        mapper.renew_at = mapper.clock() + (mapper.result.lease_end - mapper.clock()) / 2
        if state.get("upnp"):
            mapper.upnp = UpnpService(*state["upnp"])
        texts = [mapper.fqdn, mapper.gateway or ""] + list(mapper.upnp or ())
        urls = list(mapper.upnp or ())[::2]   # the control URL and the description's
        if not all(isinstance(text, str) for text in texts) \
                or not all(url.startswith("http://") for url in urls):
            raise TypeError("fqdn, gateway or UPnP URLs of the wrong kind")
        return mapper


# ---- the pod's mappings on disk and while `start` runs ----------------------

PORTMAP_FILE = "pipe2me.portmap.json"
PORTMAP_RETRY_S = 30.0             # after a failed renewal (the lease usually has long left)
PORTMAP_JOIN_S = 15.0              # how long a stop waits for a renewal under way


def portmap_path(directory):
    """The file in `directory` where the mappings are kept."""
    return os.path.join(directory, PORTMAP_FILE)


def save_portmap(directory, mapper, lifetime_s):
    """Write the mapper's state and lifetime to the port map file."""
    state = dict(mapper.state(), lifetime_s=int(lifetime_s))
    write_file_atomic(portmap_path(directory), json.dumps(state, indent=1) + "\n")


def load_portmap(directory):
    """The saved state of `map-ports`, or None when there is none; UsageError
    when a field that `start`, `check` or `clear` reads is damaged."""
    try:
        with open(portmap_path(directory), encoding="utf-8") as fh:
            state = json.loads(fh.read())
        PortMapper.from_state(state)
        int(state.get("lifetime_s") or 0)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError("%s is damaged (%s): run `map-ports` again"
                         % (portmap_path(directory), error_text(exc)))
    return state


class PortMapKeeper:
    """Keeps the saved mappings alive while `start` runs: maps at once (a clean
    stop removed them), then renews at half the lease, from a thread (the loop
    never waits on the router), PORTMAP_RETRY_S after a failure. close(unmap=True)
    removes the mappings; pipe2me.portmap.json stays for the next start."""

    def __init__(self, directory, state):
        self.directory, self.state = directory, state
        self.lifetime_s = int(state.get("lifetime_s") or PORTMAP_LIFETIME_S)
        self.mapper = PortMapper.from_state(state, same_gateway=False)
        self.loop = self.timer = self.thread = None
        self.closed = False

    def start(self, loop):
        """Map now, then keep renewing on `loop`."""
        self.loop = loop
        self.schedule(0)

    def schedule(self, delay_s):
        """Renew in delay_s (unless closed)."""
        if not self.closed:
            self.timer = self.loop.call_later(delay_s, self.renew)

    def renew(self):
        """Renew in a thread: the router's answers must not block the loop."""
        self.thread = threading.Thread(target=self.renew_in_thread, name="portmap", daemon=True)
        self.thread.start()

    def renew_in_thread(self):
        """Renew and save the mappings; schedule the next renewal (sooner after a failure)."""
        pairs = [tuple(pair) for pair in self.state["mappings"]]
        try:
            result = self.mapper.map_all(pairs, self.lifetime_s)
            save_portmap(self.directory, self.mapper, self.lifetime_s)
            delay = max(1.0, (result.lease_end - time.time()) / 2)
            log.info("port mapping renewed method=%s address=%s renew_in=%.0fs",
                     result.method, result.external_address, delay)
        except Pipe2meError as exc:
            delay = PORTMAP_RETRY_S
            log.warning("port mapping renewal failed retry_in=%.0fs error=%s", delay, exc)
        self.loop.call_soon_threadsafe(lambda: self.schedule(delay))

    def close(self, unmap):
        """Stop renewing; with unmap, remove the mappings at the router."""
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        if self.thread is not None:
            self.thread.join(PORTMAP_JOIN_S)
        if unmap:
            self.mapper.unmap_all()

# =====================================================================
# TUNNEL CLIENT — `start`: keeps the tunnel connection to the server up,
# relays streams to the local services, reconnects with backoff
# =====================================================================

class StopSignal(BaseException):
    """SIGTERM/SIGINT while `start` is dialing: ends the blocking connect at once
    and PodRunner.run() returns 0. No Pipe2meError, so no retry loop catches it."""


PROXY_PROTOCOLS = ("v1", "v2")
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
RECONNECT_FIRST_S = 0.5   # default of `start --reconnect-delay`
RECONNECT_MAX_S = 60.0
REPLACED_MAX_ROUNDS = 4   # replaced this often in a row: another pod has the tunnel, stop
LOCK_FILE = "pipe2me.lock"  # held by the one `start` of a pod directory; holds its PID
STATUS_FILE = "pipe2me.status.json"
STATUS_INTERVAL_S = 2.0
STOP_GRACE_S = 10.0                   # default of `start --stop-grace`
HOOK_TIMEOUT_S = 300                  # `start --on-cert-change CMD` may take this long
HOOK_RUNNING = threading.Lock()       # hooks run one at a time; one waits, to run after
HOOK_WAITING = threading.BoundedSemaphore(1)  # the one running (and see the latest certificate)
POD_MAX_BUFFERED_BYTES = 32 * 1024 * 1024  # bytes held for local services that read slowly
MAX_LOOKUPS = 16                      # names of local targets being resolved at once (threads)
LOOKUP_SLOTS = threading.BoundedSemaphore(MAX_LOOKUPS)  # held by each running lookup thread
LOOKUP_HELD_BYTES = 4 * 1024 * 1024   # consumer bytes held, all lookups of a session together


class PodMux(Mux):
    """The pod's end of the tunnel connection."""

    def __init__(self, runner, sock, welcome):
        self.runner = runner
        self.services = {s.public_port: s for s in runner.setup.services()}
        proxy = welcome.get("proxy_protocol")
        self.proxy_protocol = proxy if proxy in PROXY_PROTOCOLS else None
        self.fallbacks = {}  # stream id -> addresses of its target still to try
        self.resolving = {}  # stream id -> frames that came while its target's name resolves
        self.draining = False
        beat = welcome.get("heartbeat_interval_s")  # the server sends whole seconds, 1 or more
        beat = beat if isinstance(beat, (int, float)) and 1 <= beat < 1e9 else HEARTBEAT_INTERVAL_S
        super().__init__(runner.loop, sock, SERVER_SENDS, log, float(beat))
        self.connect_timeout_s = runner.connect_timeout_s

    def on_open(self, stream_id, port, consumer=None, public=None):
        """The server opened a stream: connect to the local service of that public port
        (a name is resolved off the loop first), or RESET."""
        service = self.services.get(port)
        if service is None:
            self.send(Msg.RESET, stream_id, b"no service for that port")
        elif service.target.needs_lookup():
            self.look_up_then_open(stream_id, service, consumer, public)
        else:
            self.open_local(stream_id, service, consumer, public, service.target.addresses())

    def look_up_then_open(self, stream_id, service, consumer, public):
        """Resolve the target's name in a thread (a slow resolver must not stall
        the other streams); what the consumer sends meanwhile waits in `resolving`."""
        if not LOOKUP_SLOTS.acquire(blocking=False):
            return self.refuse_local(stream_id, service, RESET_CONNECT_FAILED,
                                     "%d name lookups already running" % MAX_LOOKUPS)

        def look_up():
            try:
                found = service.target.addresses()
            except Exception as exc:  # noqa: BLE001 - OSError, or a codec's error for a bad name
                found = "cannot resolve: %s" % (getattr(exc, "strerror", None) or exc)
            finally:
                LOOKUP_SLOTS.release()
            self.loop.call_soon_threadsafe(
                lambda: self.looked_up(stream_id, service, consumer, public, found))
        try:
            threading.Thread(target=look_up, name="lookup", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had
            LOOKUP_SLOTS.release()
            return self.refuse_local(stream_id, service, RESET_CONNECT_FAILED, str(exc))
        self.resolving[stream_id] = HeldFrames()
        self.loop.call_later(self.connect_timeout_s, lambda: self.lookup_timed_out(stream_id, service))
        return None

    def looked_up(self, stream_id, service, consumer, public, found):
        """On the loop: the name's addresses (or the error text) are here; open
        the stream and hand it what the consumer sent meanwhile."""
        held = self.resolving.pop(stream_id, None)
        if held is None or self.closed:  # timed out, reset by the peer, or the session ended
            return
        if isinstance(found, str):
            self.refuse_local(stream_id, service, RESET_CONNECT_FAILED, found)
        elif self.open_contained(stream_id, self.open_local, service, consumer, public, found):
            try:
                if held.data:
                    self.dispatch(Msg.DATA, stream_id, memoryview(bytes(held.data)))
                if held.eof:
                    self.dispatch(Msg.EOF, stream_id, b"")
            except ProtocolError as exc:  # as if it had come now: the session ends
                return self.fail(str(exc))
        self.end_if_drained()

    def lookup_timed_out(self, stream_id, service):
        """The name did not resolve within connect_timeout_s: reset the stream."""
        if self.resolving.pop(stream_id, None) is not None and not self.closed:
            self.refuse_local(stream_id, service, RESET_CONNECT_TIMED_OUT,
                              "name lookup took over %g s" % self.connect_timeout_s)
            self.end_if_drained()

    def dispatch(self, msg, stream_id, payload):
        """Frames of a stream whose target is being looked up wait for it: DATA
        and EOF (the pod has sent nothing, so nothing else is due); RESET ends it."""
        held = self.resolving.get(stream_id)
        if held is None:
            return super().dispatch(msg, stream_id, payload)
        if msg == Msg.RESET:
            del self.resolving[stream_id]
            return self.end_if_drained()
        if msg not in (Msg.DATA, Msg.EOF) or held.eof:
            raise ProtocolError("stream %d: %s before the local service connected"
                                % (stream_id, msg.name if not held.eof else "data after EOF"))
        if msg == Msg.EOF:
            held.eof = True
        elif len(held.data) + len(payload) > STREAM_WINDOW_BYTES:
            raise ProtocolError("stream %d: data beyond the window" % stream_id)
        elif sum(len(h.data) for h in self.resolving.values()) + len(payload) > LOOKUP_HELD_BYTES:
            del self.resolving[stream_id]
            self.send(Msg.RESET, stream_id, b"too much data before the local service connected")
        else:
            held.data += payload
        return None

    def refuse_local(self, stream_id, service, kind, error):
        """Log the failed local target and RESET the stream with the reason."""
        log.warning("local service unavailable stream=%d target=%s error=%s",
                    stream_id, service.target, error)
        self.send(Msg.RESET, stream_id, ("%s: %s" % (kind, error)).encode())

    def open_local(self, stream_id, service, consumer, public, addresses):
        """Connect to the first of `addresses` that takes it; the stream, or None after a
        RESET."""
        sock, error, rest = dial_first(addresses)
        if sock is None:
            self.refuse_local(stream_id, service, RESET_CONNECT_FAILED, error)
            return None
        stream = self.add_stream(stream_id, sock, connecting=error == errno.EINPROGRESS)
        stream.target = str(service.target)
        if rest:
            self.fallbacks[stream_id] = rest
        if self.proxy_protocol and service.protocol != "http":
            stream.send_first(proxy_header(self.proxy_protocol, consumer, public))
        return stream

    def retry_local_connect(self, stream, reason):
        """Try the target's next address after a failed connect."""
        rest = self.fallbacks.pop(stream.id, None)
        if not rest:
            return False
        log.debug("local connect failed, next address stream=%d target=%s error=%s",
                  stream.id, stream.target, reason)
        sock, error, rest = dial_first(rest)
        if sock is None:
            return False
        if rest:
            self.fallbacks[stream.id] = rest
        stream.replace_socket(sock, error == errno.EINPROGRESS)
        return True

    def on_control(self, msg, obj):
        """CERT: the ACME state, for the runner. GOAWAY: no new streams; the session
        ends once the running ones are done."""
        if msg == Msg.CERT:
            self.runner.on_cert(obj)
            return
        if msg == Msg.GOAWAY:
            log.info("server going away reason=%s", printable(obj.get("reason"), 200))
            if obj.get("replaced_by"):
                self.runner.displaced_by = str(obj["replaced_by"])[:100].translate(CONTROL_ESCAPES)
            if obj.get("permanent"):
                self.runner.final_reason = "server: %s" % str(obj.get("reason"))[:200].translate(
                    CONTROL_ESCAPES)
            self.draining = True
            if not self.streams and not self.resolving:
                self.destroy("server going away")
            return
        raise ProtocolError("unexpected %s after WELCOME" % msg.name)

    def on_stream_closed(self, stream):
        """A draining session ends with its last stream."""
        self.fallbacks.pop(stream.id, None)
        self.end_if_drained()

    def end_if_drained(self):
        """A draining session ends once no stream is open or being looked up."""
        if self.draining and not self.streams and not self.resolving and not self.closed:
            self.destroy("drained")

    def on_closed(self, reason):
        """Tell the runner, which reconnects."""
        self.runner.on_session_closed(reason)


class HeldFrames:
    """What the server sent for a stream whose target's name is being looked up."""

    def __init__(self):
        self.data = bytearray()
        self.eof = False


def dial_first(addresses):
    """Start a non-blocking connect to the first address that does not fail at
    once: (socket, 0 or EINPROGRESS, addresses left) or (None, error, [])."""
    addresses, error = list(addresses), "no address"
    while addresses:
        family, sockaddr = addresses.pop(0)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(sockaddr)
        if err in (0, errno.EINPROGRESS):  # on loopback often done at once
            return sock, err, addresses
        sock.close()
        error = os.strerror(err)
    return None, error, []


def proxy_header(version, consumer, public):
    """The PROXY protocol header (haproxy's spec, "v1" text or "v2" binary)
    naming the consumer and the public end it reached; without addresses
    (a server that does not send them) v1 says UNKNOWN and v2 LOCAL."""
    if consumer is None or public is None:
        if version == "v1":
            return b"PROXY UNKNOWN\r\n"
        return PROXY_V2_SIGNATURE + b"\x20\x00" + U16.pack(0)
    six = ":" in consumer[0]
    if version == "v1":
        return ("PROXY %s %s %s %d %d\r\n" % ("TCP6" if six else "TCP4", consumer[0], public[0],
                                             consumer[1], public[1])).encode("ascii")
    family = socket.AF_INET6 if six else socket.AF_INET
    body = (socket.inet_pton(family, consumer[0]) + socket.inet_pton(family, public[0])
            + U16.pack(consumer[1]) + U16.pack(public[1]))
    return PROXY_V2_SIGNATURE + bytes([0x21, 0x21 if six else 0x11]) + U16.pack(len(body)) + body


class PodRunner:
    """Runs `start`: one session at a time, forever, until stopped or rejected."""

    def __init__(self, files, setup, stop_grace_s=STOP_GRACE_S, on_cert_change=None,
                 connect_timeout_s=LOCAL_CONNECT_TIMEOUT_S, hello_timeout_s=HELLO_TIMEOUT_S,
                 reconnect_delay_s=RECONNECT_FIRST_S):
        self.files, self.setup = files, setup
        self.stop_grace_s, self.connect_timeout_s = stop_grace_s, connect_timeout_s
        self.hello_timeout_s = hello_timeout_s  # for the server's TLS handshake, and for WELCOME
        self.reconnect_delay_s = reconnect_delay_s  # the first back-off, doubled each time
        self.on_cert_change = on_cert_change  # shell command run after the cert file changed
        self.acme = None  # the last ACME state from the server (CERT frame), chain left out
        self.chain_end = None  # not_after of the ACME chain in use, watched by status_tick()
        self.status_path = os.path.join(files.dir, STATUS_FILE)
        self.status_written = None  # the file's content, to write only changes
        self.loop = EventLoop(log, POD_MAX_BUFFERED_BYTES)
        self.session = None
        self.stop_requested = False
        self.connecting = False  # in connect(): a stop signal raises StopSignal
        self.failures = 0
        self.up_since = None
        self.closed_reason = None
        self.totals = [0, 0]  # bytes in/out of finished sessions
        self.displaced_by = None  # the address of the connection that replaced ours
        self.displaced = 0        # ... how often in a row; from the first, HELLO yields
        self.final_reason = None  # the server ended the tunnel for good (GOAWAY permanent)

    # -- one session --------------------------------------------------
    def tls_context(self):
        """TLS 1.3 with the pod's certificate, trusting only the pinned CA."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_verify_locations(self.files.cacert)
        context.load_cert_chain(self.files.tunnel_cert_in_use(), self.files.key)
        return context

    def connect(self):
        """Dial, authenticate and greet; (tls socket, WELCOME). Meanwhile a stop
        signal raises StopSignal (on_stop_signal)."""
        self.connecting, raw = True, None
        try:
            raw = socket.create_connection(split_host_port(self.endpoint()),
                                           timeout=self.hello_timeout_s)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.tls_context().wrap_socket(raw, server_hostname=self.server_name())
            tls.sendall(encode_control(Msg.HELLO, {
                "kind": "control", "version": PROTOCOL_VERSION, "tunnel": self.setup.id,
                "features": list(POD_FEATURES), "yield": self.displaced > 0}))
            answer = self.read_answer(tls)
        except BaseException:
            if raw is not None:
                raw.close()
            raise
        finally:
            self.connecting = False
        tls.settimeout(None)
        return tls, answer

    def endpoint(self):
        """host:port of the server's tunnel port; PIPE2ME_TUNNEL overrides it."""
        return os.environ.get("PIPE2ME_TUNNEL") or self.setup.tunnel

    def server_name(self):
        """The name the server's certificate must carry: the tunnel domain."""
        return self.setup.tunnel_domain or self.setup.fqdn.split(".", 1)[1]

    def read_answer(self, tls):
        """WELCOME's object; Rejected for a final REJECT, Unavailable otherwise."""
        try:
            msg, _stream, payload = read_frame_blocking(
                tls, SERVER_SENDS, time.monotonic() + self.hello_timeout_s)
            obj = decode_control(payload)
        except ProtocolError as exc:
            raise Unavailable("greeting failed: %s" % exc) from None
        if msg == Msg.WELCOME:
            return obj
        if msg == Msg.REJECT:
            reason = str(obj.get("reason", "rejected"))[:300]
            if obj.get("replaced_by") and not obj.get("permanent"):
                raise Displaced(reason, str(obj["replaced_by"])[:100].translate(CONTROL_ESCAPES))
            raise (Rejected if obj.get("permanent") else Unavailable)(
                "server rejected the tunnel: " + reason)
        raise Unavailable("expected WELCOME from the server, got %s" % msg.name)

    def on_session_closed(self, reason):
        """Count the session's bytes, note why it ended, and leave the loop to reconnect."""
        session = self.session
        self.totals[0] += session.local_written_bytes
        self.totals[1] += session.local_read_bytes
        self.session, self.up_since, self.closed_reason = None, None, reason
        log.info("tunnel down reason=%s", reason)
        self.write_status()
        self.loop.stop()

    # -- the loop of sessions -------------------------------------------
    def run(self):
        """Connect, run the session, reconnect with backoff until asked to stop (0
        then); Rejected when the server refuses for good."""
        self.loop.call_later(STATUS_INTERVAL_S, self.status_tick)
        try:
            while not self.stop_requested:
                self.check_still_wanted()
                try:
                    tls, welcome = self.connect()
                except Rejected:
                    raise
                except Displaced as exc:
                    self.displaced_by = exc.peer
                    self.check_still_wanted()
                    continue
                except (Pipe2meError, OSError, ValueError) as exc:
                    self.closed_reason = str(exc)
                    self.wait_before_retry(exc)
                    continue
                self.displaced, began = 0, time.monotonic()
                self.session = PodMux(self, tls, welcome)
                self.up_since = time.time()
                log.info("tunnel up fqdn=%s server=%s", welcome.get("fqdn"), self.endpoint())
                log_public_urls(self.setup.fqdn, self.setup.urls, welcome)
                self.write_status()
                self.loop.run()
                if time.monotonic() - began >= self.reconnect_delay_s:
                    self.failures = 0
                elif not (self.stop_requested or self.final_reason or self.displaced_by):
                    self.wait_before_retry(self.closed_reason)  # a server ending each session at once
        except StopSignal:
            log.info("stopped while connecting")
        return 0

    def check_still_wanted(self):
        """Before each connect: Rejected when the server ended the tunnel,
        `clear` removed the setup, or another connection keeps replacing
        ours; after a replacement, back off instead of taking it back."""
        if self.final_reason:
            raise Rejected(self.final_reason)
        missing = [path for path in (self.files.info, self.files.cert, self.files.key)
                   if not os.path.exists(path)]
        if missing:
            raise Rejected("the setup in %s is gone (%s removed, by `clear`?): stopping"
                           % (self.files.dir, os.path.basename(missing[0])))
        peer, self.displaced_by = self.displaced_by, None
        if peer is None:
            return
        self.displaced += 1
        if self.displaced >= REPLACED_MAX_ROUNDS:
            raise Rejected("tunnel %s is held by another connection from %s (replaced %d times): "
                           "another pod runs with this tunnel's key, stopping"
                           % (self.setup.fqdn, peer, self.displaced))
        delay = self.reconnect_delay_s * 2 ** self.displaced
        log.warning("replaced by another connection of this tunnel from=%s round=%d retry_in=%.1fs",
                    peer, self.displaced, delay)
        self.closed_reason = "replaced by another connection from %s" % peer
        self.pause(delay)

    def wait_before_retry(self, exc):
        """Back off (exponential, with jitter) before the next connect."""
        self.failures += 1
        ceiling = min(RECONNECT_MAX_S, self.reconnect_delay_s * 2 ** min(self.failures, 10))
        delay = random.uniform(ceiling / 2, ceiling)
        log.warning("tunnel connect failed attempt=%d retry_in=%.1fs error=%s",
                    self.failures, delay, exc)
        self.pause(delay)

    def pause(self, delay_s):
        """Write the status, then run the loop (timers, port keeper, stop) for delay_s."""
        self.write_status()
        self.loop.call_later(delay_s, self.loop.stop)
        self.loop.run()

    def on_stop_signal(self, *_):
        """SIGTERM/SIGINT handler (main thread, between bytecodes). A session
        drains through the loop; while dialing there is nothing to drain and
        the connect could block for hello_timeout_s, so it ends right here."""
        if self.connecting:
            self.connecting = False
            raise StopSignal()
        self.loop.call_soon_threadsafe(self.request_stop)

    def request_stop(self):
        """SIGTERM: let running streams finish (bounded), then stop."""
        self.stop_requested = True
        session = self.session
        if session is None or not session.streams:
            if session is not None:
                session.destroy("pod stopping")
            return self.loop.stop()
        session.send_control(Msg.GOAWAY, {"reason": "pod stopping"})
        session.draining = True
        self.loop.call_later(self.stop_grace_s,
                             lambda: self.session and self.session.destroy("grace over"))

    # -- the publicly trusted certificate (CERT frames) -------------------
    def on_cert(self, obj):
        """The server's ACME state for this tunnel: a new chain is installed and the hook run."""
        self.acme = {key: obj.get(key) if key in ("state", "reason") or type(obj.get(key)) is int
                     and 0 <= obj[key] < 2 ** 40 else None  # times `status` can print, or None
                     for key in ("state", "reason", "next_try_at", "not_after")}
        try:
            if take_acme(self.files, obj):
                self.run_cert_hook()
        except Pipe2meError as exc:
            log.warning("acme certificate not written reason=%s", exc)
        if obj.get("chain"):  # status_tick() puts the server-CA certificate back at its end
            self.chain_end = obj["not_after"] if isinstance(obj.get("not_after"), int) else None
        self.write_status()

    def run_cert_hook(self):
        """`start --on-cert-change CMD`, in a thread, after pipe2me.openssl.cert changed."""
        if self.on_cert_change and HOOK_WAITING.acquire(blocking=False):  # else one waits
            threading.Thread(target=run_hook, args=(self.on_cert_change,), daemon=True).start()

    def check_chain_end(self):
        """From status_tick(): once the chain in use has ended, the server-CA certificate,
        even while the server cannot be reached to say so (the wall clock decides,
        as for the certificate)."""
        not_after = self.chain_end
        if not_after is None or time.time() < not_after:
            return
        self.chain_end = None
        if restore_tunnel_cert(self.files, not_after):
            self.acme = dict(self.acme or {}, state="expired",
                             reason="the certificate expired before a renewal came")
            self.run_cert_hook()

    # -- status for `pipe2me_pod.py status` -----------------------------
    def status_tick(self):
        """Write the status file every STATUS_INTERVAL_S (and see whether the ACME chain ended)."""
        self.check_chain_end()
        self.write_status()
        self.loop.call_later(STATUS_INTERVAL_S, self.status_tick)

    def write_status(self):
        """The status file that `status` reads: up, streams, bytes, last error."""
        session = self.session
        live_in = session.local_written_bytes if session else 0
        live_out = session.local_read_bytes if session else 0
        status = {"version": 1, "pid": os.getpid(), "up": session is not None,
                  "since": self.up_since, "streams": len(session.streams) if session else 0,
                  "bytes_in": self.totals[0] + live_in, "bytes_out": self.totals[1] + live_out,
                  "last_error": None if session else self.closed_reason, "acme": self.acme}
        text = json.dumps(status) + "\n"
        if text == self.status_written:
            return
        try:
            write_file_atomic(self.status_path, text, durable=False)
            self.status_written = text
        except Pipe2meError as exc:
            log.debug("status file not written: %s", exc)


def run_hook(command):
    """Run `start --on-cert-change CMD` through /bin/sh; its exit status is logged."""
    import subprocess  # only when a hook runs: `start` stays small otherwise
    with HOOK_RUNNING:
        HOOK_WAITING.release()  # from here on, a change gets a run after this one
        try:
            done = subprocess.run(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL,
                                  timeout=HOOK_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("on-cert-change hook failed reason=%s", exc)
            return
    log.info("on-cert-change hook ran status=%d", done.returncode)


def log_public_urls(fqdn, urls, fronts):
    """Log each URL consumers reach the tunnel by: the per-port URLs, then the
    HTTP front (Host-routed, for an http service) and the SNI front (for
    https); `fronts` has the server's http_port and https_port when known."""
    found = list(urls)
    schemes = [urllib.parse.urlsplit(url).scheme for url in urls]
    for scheme, key, default in (("http", "http_port", 80), ("https", "https_port", 443)):
        port = fronts.get(key)
        if scheme in schemes and isinstance(port, int) and port > 0:
            found.append("%s://%s%s/" % (scheme, fqdn, "" if port == default else ":%d" % port))
    for url in found:
        log.info("public url=%s", url)


class Displaced(Unavailable):
    """The server keeps another live connection of this tunnel (from `peer`)."""

    def __init__(self, message, peer):
        super().__init__(message)
        self.peer = peer


def lock_pod_dir(directory):
    """Hold DIR/pipe2me.lock for the life of this process: one `start` per pod
    directory. UsageError naming the PID of the `start` that holds it."""
    path = os.path.join(directory, LOCK_FILE)
    try:
        fd = lock_pid_file(path, 0o644)
    except OSError as exc:
        raise UsageError("cannot open %s: %s" % (path, error_text(exc)))
    if fd is None:
        raise UsageError("another `start` runs for %s (pid %s): one start per pod directory"
                         % (directory, lock_holder(directory) or "unknown"))
    return fd


def lock_holder(directory):
    """The PID of the `start` that holds DIR's lock, or None."""
    return lock_holder_pid(os.path.join(directory, LOCK_FILE))


def is_local_address(ip):
    """True when `ip` is an address of this machine (a socket can bind it)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError:
            return False
    return True


def check_no_loop(setup, endpoint):
    """UsageError when a service's local target is one of this tunnel's own
    public ports on the server: consumers would be connected back to the
    server, each connection opening another, without end."""
    public = {service.public_port for service in setup.services()}
    host = split_host_port(endpoint)[0]
    try:
        server_ips = {info[4][0] for info in socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM)}
    except OSError:
        return  # the server's name does not resolve now: nothing to compare with
    server_here = any(is_local_address(ip) for ip in server_ips)
    for service in setup.services():
        if service.target.port not in public:
            continue
        try:
            addresses = service.target.addresses()
        except OSError:
            continue
        if any(sockaddr[0] in server_ips or server_here and is_local_address(sockaddr[0])
               for _family, sockaddr in addresses):
            raise UsageError(
                "local target %s of the %s service is this tunnel's own public port %d on the "
                "server: give the service's real port (PIPE2ME_LOCAL_PORTS in %s, or "
                "--local-ports at setup)" % (service.target, service.protocol,
                                             service.target.port, LOCAL_FILE))


def split_host_port(endpoint):
    """(host, port) of a `host:port` or `[v6]:port` endpoint, or UsageError."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError("bad tunnel endpoint %r (expected host:port)" % endpoint)
    return host.strip("[]"), int(port)


# =====================================================================
# ECHO SERVICES — `start --echo`: built-in local services for testing a
# setup end to end (http: the request line; https: the same over TLS with
# the pod's certificate; others: bytes echoed back)
# =====================================================================

ECHO_HEAD_BYTES = 64 * 1024
ECHO_TIMEOUT_S = 30


def start_echo_services(files, setup):
    """Start one echo service per protocol on its local port; returns the
    listening sockets (closing one stops its service)."""
    listeners = []
    for service in setup.services():
        context = EchoTls(files) if service.protocol == "https" else None
        listener = echo_listener(service.target)
        threading.Thread(target=serve_echo, args=(listener, service.protocol, context),
                         name="echo-%d" % service.local_port, daemon=True).start()
        listeners.append(listener)
        log.info("echo service protocol=%s target=%s", service.protocol, service.target)
    return listeners


def echo_listener(target):
    """A socket listening on the target's first address (127.0.0.1 for a bare PORT)."""
    try:
        family, sockaddr = target.addresses()[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
    except (OSError, IndexError) as exc:
        raise Unavailable("echo service cannot resolve %s: %s" % (target, exc)) from None
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(sockaddr)
        listener.listen(128)
    except OSError as exc:
        listener.close()
        raise Unavailable("echo service cannot listen on %s: %s"
                          % (target, exc.strerror)) from None
    return listener


class EchoTls:
    """The https echo service's TLS context, loaded again when the certificate
    file changes (a renewed chain), so new connections get it without a restart."""

    def __init__(self, files):
        self.files = files
        self.loaded = None  # (mtime_ns, size) of the file behind self.context
        self.context = None
        self.lock = threading.Lock()
        self.current()

    def current(self):
        """The TLS context, loaded again if the certificate file changed."""
        stat = os.stat(self.files.cert)
        with self.lock:
            if self.loaded != (stat.st_mtime_ns, stat.st_size):
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(self.files.cert, self.files.key)
                self.context, self.loaded = context, (stat.st_mtime_ns, stat.st_size)
            return self.context


def serve_echo(listener, protocol, context):
    """Accept until the listener is closed; one thread per connection."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=echo_one, args=(conn, protocol, context), daemon=True).start()


def echo_one(conn, protocol, context):
    """Serve one echo connection: the request line for http(s), the bytes for others."""
    try:
        conn.settimeout(ECHO_TIMEOUT_S)
        if context is not None:
            conn = context.current().wrap_socket(conn, server_side=True)
        (echo_http if protocol in ("http", "https") else echo_bytes)(conn)
    except OSError as exc:
        log.debug("echo connection failed: %s", exc)
    finally:
        conn.close()


def echo_http(conn):
    """Answer one HTTP request with its request line."""
    head = b""
    while b"\r\n\r\n" not in head and len(head) < ECHO_HEAD_BYTES:
        data = conn.recv(4096)
        if not data:
            return
        head += data
    line = head.split(b"\r\n", 1)[0]
    body = b"" if line.startswith(b"HEAD ") else line + b"\n"
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n%s" % (len(line) + 1, body))


def echo_bytes(conn):
    """Echo bytes until EOF, then half-close."""
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


# =====================================================================
# COMMANDS — one function per command, each takes the parsed arguments
# =====================================================================

def print_fields(*fields):
    """Print `KEY=value` lines for the (KEY, value) pairs, leaving out those of value None."""
    for key, value in fields:
        if value is not None:
            print("%s=%s" % (key, value))


def parse_protocols(text):
    """A comma list of protocols as a list; UsageError on unknown ones."""
    protocols = [item.strip().lower() for item in (text or "").split(",")]
    for protocol in protocols:
        if protocol not in SERVICE_PROTOCOLS:
            raise UsageError("bad protocol %r in --protocols: choose from %s"
                             % (protocol, ",".join(SERVICE_PROTOCOLS)))
    return protocols


def cmd_setup(args):
    """Create a tunnel on the server and the files of the setup; print the FQDN."""
    files = PodFiles(args.dir)
    present = files.existing()
    if present:
        raise UsageError("%s already holds a setup (%s): run `clear` first or use another --dir"
                         % (files.dir, os.path.basename(present[0])))
    server = normalize_server_url(args.server)
    if not args.auth:
        raise UsageError("missing token: pass --auth TOKEN")
    protocols = parse_protocols(args.protocols)
    local_ports = None
    if args.local_ports:
        local_ports = parse_targets(args.local_ports, "--local-ports")
        if len(local_ports) != len(protocols):
            raise UsageError("--local-ports has %d targets for %d protocols: give one port per protocol"
                             % (len(local_ports), len(protocols)))
    proxy = parse_proxy_protocol(args.proxy_protocol)
    run_openssl(["version"])  # a missing openssl fails the setup before anything exists
    context = make_ssl_context(args.cacert, args.insecure)
    created = make_pod_dir(files.dir)
    try:
        fqdn = create_tunnel(files, ApiClient(server, context), args.auth, protocols,
                             local_ports, proxy)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # not empty, or gone: leave it
                os.rmdir(files.dir)
        raise
    print(fqdn)
    return 0


def parse_proxy_protocol(text):
    """--proxy-protocol v1|v2|off as "v1", "v2", "off" or None (not given)."""
    if text is None:
        return None
    value = text.strip().lower()
    if value not in PROXY_PROTOCOLS + ("off",):
        raise UsageError("bad --proxy-protocol %r: choose v1, v2 or off" % text)
    return value


def warn_if_proxy_ignored(tunnel, wanted):
    """An older server keeps no PROXY protocol setting: say so."""
    if wanted and (tunnel.get("proxy_protocol") or "off") != wanted:
        log.warning("the server did not keep --proxy-protocol %s: is it older than this pod?",
                    wanted)


def create_tunnel(files, api, token, protocols, local_ports, proxy_protocol=None):
    """Create the tunnel on the server and install it in `files`; its FQDN. Once
    the tunnel exists, a failure deletes it (best effort) and the files written."""
    config = check_server_config(api, protocols)
    tunnel = api.create_tunnel(token, protocols, proxy_protocol)
    warn_if_proxy_ignored(tunnel, proxy_protocol)
    log.info("tunnel created tunnel=%s fqdn=%s", tunnel["id"], tunnel["fqdn"])
    log_public_urls(tunnel["fqdn"], tunnel["urls"], config)
    try:
        install_tunnel(files, api, tunnel, local_ports or tunnel["ports"])
    except BaseException:
        undo_setup(files, api, tunnel)
        raise
    return tunnel["fqdn"]


def make_pod_dir(directory):
    """Create the pod directory (mode 0700) if needed; True when it was created,
    UsageError unless it is writable."""
    created = not os.path.isdir(directory)
    try:
        os.makedirs(directory, mode=POD_DIR_MODE, exist_ok=True)
    except OSError as exc:
        raise UsageError("cannot create %s: %s" % (directory, error_text(exc)))
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError("cannot write to %s: permission denied" % directory)
    return created


def check_server_config(api, protocols):
    """Refuse a server of another protocol version or one that lacks a protocol."""
    config = api.get_config()
    if config.get("protocol_version") != PROTOCOL_VERSION:
        raise Rejected("server %s speaks protocol version %r, this pod %d: use matching versions"
                       % (api.base_url, config.get("protocol_version"), PROTOCOL_VERSION))
    offered = config.get("protocols")
    if isinstance(offered, list):
        for protocol in protocols:
            if protocol not in offered:
                raise Rejected("server %s does not offer protocol %s (it offers %s)"
                               % (api.base_url, protocol, ",".join(map(str, offered))))
    return config


def install_tunnel(files, api, tunnel, local_ports):
    """Make the key and CSR, get the certificate and CA, write the files of the setup."""
    api.secret = tunnel["secret"]
    write_file_atomic(files.key, make_key(), SECRET_FILE_MODE)
    cert = api.sign(tunnel["id"], make_csr(files.key, tunnel["fqdn"]))
    cacert = api.get_cacert()
    check_pin(api, cacert)
    write_file_atomic(files.cert, cert)
    write_file_atomic(files.cacert, cacert)
    write_local(files, api.base_url, local_ports)
    write_info(files, api.base_url, tunnel, tunnel["secret"])


def check_pin(api, cacert):
    """Over https, prove the CA about to be pinned verifies the server, so later calls work."""
    if not api.base_url.startswith("https:"):
        return
    try:
        context = ssl.create_default_context(cadata=cacert)
    except ssl.SSLError as exc:
        raise Rejected("bad CA certificate from %s/cacert: %s" % (api.base_url, exc))
    context.load_default_certs()  # as pinned_ssl_context: the API's name may have an ACME certificate
    ApiClient(api.base_url, context, pinned=True).get_config()


def undo_setup(files, api, tunnel):
    """Best effort after a failed setup: delete the tunnel on the server, remove our files."""
    try:
        api.delete(tunnel["id"])
        log.info("tunnel deleted after failed setup tunnel=%s", tunnel["id"])
    except Pipe2meError as exc:
        log.warning("could not delete the tunnel after failed setup tunnel=%s reason=%s",
                    tunnel["id"], exc)
    files.remove_all()


def cmd_env(args):
    """Print the settings as KEY='value' lines for `eval`; never the secret."""
    setup = read_setup(PodFiles(args.dir))
    values = {"PIPE2ME_SERVER": setup.server, "PIPE2ME_ID": setup.id, "PIPE2ME_FQDN": setup.fqdn}
    values.update(("PIPE2ME_URLS_%d" % index, url) for index, url in enumerate(setup.urls))
    values["PIPE2ME_TUNNEL"] = setup.tunnel
    values["PIPE2ME_LOCAL_PORTS"] = ",".join(str(port) for port in setup.local_ports)
    values["PIPE2ME_PROXY_PROTOCOL"] = setup.proxy_protocol
    sys.stdout.write(format_inc(values))
    return 0


def cmd_verify(args):
    """Print the FQDN while the tunnel exists and has not expired (also before
    any `start`); Rejected (exit 4) naming why (expired, unknown) otherwise."""
    setup = read_setup(PodFiles(args.dir))
    status, answer = api_for_setup(setup).verify(setup.id)
    if status == 200 and answer.get("status") == "online":
        print(setup.fqdn)
        return 0
    state = {410: "expired", 404: "unknown"}.get(status, str(answer.get("status")))
    raise Rejected("tunnel %s %s" % (setup.fqdn, state))


def cmd_update(args):
    """Extend (with --auth), refresh the settings, renew the certificate when due."""
    setup = read_setup(PodFiles(args.dir))
    files, api = setup.files, api_for_setup(setup)
    if args.auth:
        api.extend(setup.id, args.auth)
        log.info("tunnel extended tunnel=%s", setup.id)
    proxy = parse_proxy_protocol(args.proxy_protocol)
    if proxy:
        warn_if_proxy_ignored(api.change(setup.id, proxy_protocol=proxy), proxy)
        log.info("proxy protocol set tunnel=%s proxy_protocol=%s", setup.id, proxy)
    tunnel = api.get_tunnel(setup.id)
    changed = tunnel["expires_at"] != setup.expires_at
    if tunnel.get("status") == "expired":
        write_info(files, setup.server, tunnel, setup.secret)
        raise Rejected("tunnel %s expired: extend it with `update --auth TOKEN`" % setup.fqdn)
    tunnel_cert = files.tunnel_cert_in_use()
    if changed or cert_needs_renewal(tunnel_cert):
        before = read_text(tunnel_cert)
        cert = api.sign(setup.id, make_csr(files.key, setup.fqdn))
        write_file_atomic(tunnel_cert, cert)
        if read_text(files.cert) in (None, before):  # no ACME chain in use: services get it too
            write_file_atomic(files.cert, cert)
        log.info("certificate renewed tunnel=%s", setup.id)
    if isinstance(tunnel.get("acme"), dict):
        take_acme(files, tunnel["acme"])
    write_info(files, setup.server, tunnel, setup.secret)
    log.info("tunnel updated tunnel=%s expires_at=%d", setup.id, tunnel["expires_at"])
    return 0


def cmd_clear(args):
    """Delete the tunnel on the server and remove the files of the setup."""
    files = PodFiles(args.dir)
    if not files.existing():
        raise UsageError("no setup in %s: nothing to clear" % files.dir)
    setup = read_setup(files) if os.path.exists(files.info) else None
    what = "tunnel %s and its files in %s" % (setup.fqdn, files.dir) if setup \
        else "the files in %s (no tunnel settings, the server is not told)" % files.dir
    if not args.yes:
        confirm("Delete %s?" % what)
    running = lock_holder(files.dir)
    if setup:
        try:
            status = api_for_setup(setup).delete(setup.id)
        except Pipe2meError as exc:
            raise type(exc)("%s; nothing removed from %s" % (exc, files.dir))
        if status == 200:
            log.info("tunnel deleted tunnel=%s", setup.id)
        else:
            log.warning("tunnel already gone on the server tunnel=%s status=%d", setup.id, status)
    try:
        portmap = load_portmap(files.dir)
    except UsageError as exc:  # the tunnel is gone already: the files go too
        log.warning("port mappings not removed at the router: %s", exc)
        portmap = None
    if portmap is not None:  # the router's mappings go first (best effort), then their file
        PortMapper.from_state(portmap).unmap_all()
    remove_file(portmap_path(files.dir))
    removed = files.remove_all()
    log.info("files removed dir=%s files=%s", files.dir, ",".join(removed))
    if running:
        wait_for_unlock(files.dir, running, CLEAR_WAIT_S)
    return 0


CLEAR_WAIT_S = 15.0


def wait_for_unlock(directory, pid, timeout_s):
    """After `clear`: the running `start` (pid) sees its tunnel gone, exits 4
    and so releases the directory's lock."""
    deadline = time.monotonic() + timeout_s
    while lock_holder(directory) and time.monotonic() < deadline:
        time.sleep(0.05)
    if lock_holder(directory):
        log.warning("the running start has not stopped yet pid=%d", pid)
    else:
        log.info("the running start stopped pid=%d", pid)


def confirm(question):
    """Ask on the terminal; UsageError unless the answer is yes."""
    if not sys.stdin.isatty():
        raise UsageError("refusing to clear without --yes: stdin is not a terminal")
    sys.stderr.write(question + " [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise UsageError("not confirmed: nothing changed")


def cmd_service(args):
    """Print a service definition that runs `start` for this directory at boot."""
    files = PodFiles(args.dir)
    fqdn = read_setup(files).fqdn if os.path.exists(files.info) else None
    name = "pipe2me-" + fqdn.split(".")[0] if fqdn else "pipe2me"
    argv = pod_argv() + ["--dir", files.dir, "start"]
    if args.systemd:
        user = dir_owner(files.dir)  # run as the directory's owner, unless root
        text = SYSTEMD_TEMPLATE.replace("@USER@\n", "User=%s\n" % user if user else "")
        command = " ".join(systemd_quote(arg) for arg in argv)
    else:
        text = PROCD_TEMPLATE if args.procd else SYSV_TEMPLATE.replace(
            "@VERBS@", sysv_verbs("@NAME@", 20, SYSV_MORE_VERBS, "start|stop|restart|status"))
        command = " ".join(shlex.quote(arg) for arg in argv)
    for placeholder, value in (("@NAME@", name), ("@TITLE@", fqdn or files.dir),
                               ("@COMMAND@", command), ("@DELAY@", str(SERVICE_RESTART_DELAY_S))):
        text = text.replace(placeholder, value)
    sys.stdout.write(text)
    return 0


def pod_argv():
    """How a service runs this pod: the installed `pipe2me` command when that
    is how it was started (pip), else this Python and this script's path."""
    import shutil
    if os.path.basename(sys.argv[0] or "") == "pipe2me":
        installed = shutil.which("pipe2me")
        if installed:
            return [os.path.abspath(installed)]
    python = sys.executable if sys.executable and os.path.isabs(sys.executable) else "python3"
    return [python, os.path.abspath(__file__)]


def dir_owner(directory):
    """The name of the directory's owner unless it is root, for systemd's User=."""
    try:
        import pwd
        uid = os.stat(directory).st_uid
        return pwd.getpwuid(uid).pw_name if uid != 0 else None
    except (ImportError, OSError, KeyError):
        return None


SYSTEMD_TEMPLATE = """\
# Save as /etc/systemd/system/@NAME@.service, then:
#   systemctl daemon-reload && systemctl enable --now @NAME@
[Unit]
Description=pipe2me tunnel @TITLE@
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart=@COMMAND@
Restart=on-failure
RestartSec=@DELAY@
# exit 2 (bad setup) and 4 (rejected, e.g. expired): restarting will not help
RestartPreventExitStatus=2 4
@USER@

[Install]
WantedBy=multi-user.target
"""

PROCD_TEMPLATE = """\
#!/bin/sh /etc/rc.common
# pipe2me tunnel @TITLE@
# Save as /etc/init.d/@NAME@, then:
#   chmod +x /etc/init.d/@NAME@ && /etc/init.d/@NAME@ enable && /etc/init.d/@NAME@ start
START=99
STOP=10
USE_PROCD=1

start_service() {
	procd_open_instance
	procd_set_param command @COMMAND@
	# respawn: threshold 3600 s, wait @DELAY@ s, retry forever
	procd_set_param respawn 3600 @DELAY@ 0
	procd_set_param stdout 1
	procd_set_param stderr 1
	procd_close_instance
}
"""

SYSV_TEMPLATE = """\
#!/bin/sh
### BEGIN INIT INFO
# Provides:          @NAME@
# Required-Start:    $network $remote_fs $syslog
# Required-Stop:     $network $remote_fs $syslog
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: pipe2me tunnel @TITLE@
### END INIT INFO
# Save as /etc/init.d/@NAME@, then:
#   chmod +x /etc/init.d/@NAME@ && update-rc.d @NAME@ defaults && /etc/init.d/@NAME@ start

PIDFILE=/var/run/@NAME@.pid
LOGFILE=/var/log/@NAME@.log

# Runs the pod and restarts it after a failure; exit 0 (stopped), 2 (bad setup)
# and 4 (rejected, e.g. expired) end the loop since restarting will not help.
supervise() {
	child=
	trap 'if [ -n "$child" ]; then kill "$child" 2>/dev/null; wait "$child"; fi; exit 0' TERM
	while :; do
		@COMMAND@ &
		child=$!
		wait "$child"
		rc=$?
		child=
		case $rc in 0|2|4) exit "$rc" ;; esac
		sleep @DELAY@
	done
}

@VERBS@"""

SYSV_MORE_VERBS = """\
restart|force-reload)
	do_stop
	"$0" start
	;;
"""


# `start` re-executes itself from compiled code (SHARED process) and hands its
# parsed arguments over in this variable; CLI reads them back.
ARGS_VARIABLE = "PIPE2ME_ARGS"


def hand_over_arguments(args):
    """ARGS_VARIABLE's value for run_from_compiled_code(): the parsed `args`."""
    values = {name: value for name, value in vars(args).items() if name != "func"}
    return {ARGS_VARIABLE: json.dumps(values)}


def cmd_start(args):
    """`start`: run the tunnel in the foreground until stopped."""
    files = PodFiles(args.dir)
    setup = read_setup(files)
    run_from_compiled_code(hand_over_arguments(args))
    lock_pod_dir(files.dir)  # after the re-exec: the lock's descriptor does not survive exec
    raise_open_file_limit()
    runner = PodRunner(files, setup, args.stop_grace, args.on_cert_change, args.connect_timeout,
                       args.hello_timeout, args.reconnect_delay)
    check_no_loop(setup, runner.endpoint())
    servers = start_echo_services(files, setup) if args.echo else []
    keeper = start_port_keeper(files.dir, runner.loop)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, runner.on_stop_signal)
    log.info("pod ready fqdn=%s", setup.fqdn)
    clean = False
    try:
        code = runner.run()
        clean = True
        return code
    finally:
        if keeper is not None:
            keeper.close(unmap=clean)  # a clean stop removes the router's mappings
        for listener in servers:
            listener.close()
        runner.session = None
        runner.write_status()


def cmd_status(args):
    """`status`: whether the tunnel connection is up, from the status file `start` writes."""
    setup = read_setup(PodFiles(args.dir))
    try:
        with open(os.path.join(setup.files.dir, STATUS_FILE), encoding="utf-8") as fh:
            status = json.loads(fh.read())
    except (OSError, ValueError):
        status = {}
    running = bool(status.get("pid")) and pid_alive(status["pid"]) and status.get("up") is not None
    connected = running and bool(status.get("up"))
    last_error = status.get("last_error") if not status.get("up") else None
    print_fields(
        ("FQDN", setup.fqdn), ("RUNNING", "yes" if running else "no"),
        ("CONNECTED", "yes" if connected else "no"),
        ("SINCE", iso_time(status["since"]) if connected and status.get("since") else None),
        ("LOCAL_PORTS", ",".join(str(target) for target in setup.local_ports)),
        ("STREAMS", "%d" % (status.get("streams", 0) if running else 0)),
        ("BYTES_IN", "%d" % status.get("bytes_in", 0)),
        ("BYTES_OUT", "%d" % status.get("bytes_out", 0)),
        ("LAST_ERROR", shlex.quote(printable(last_error)) if last_error else None))
    acme = status.get("acme")
    if isinstance(acme, dict):  # the server uses ACME: the publicly trusted certificate's state
        print_fields(
            ("ACME", shlex.quote(printable(acme.get("state")))),  # peer text, as in a log line
            ("ACME_NOT_AFTER", iso_time(acme["not_after"]) if acme.get("not_after") else None),
            ("ACME_REASON", shlex.quote(printable(acme.get("reason") or ""))
             if acme.get("state") != "valid" or acme.get("reason") else None),
            ("ACME_NEXT_TRY", iso_time(acme["next_try_at"]) if acme.get("next_try_at") else None))
    return 0 if connected else 3


def pid_alive(pid):
    """Whether a process with that PID exists."""
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True


def start_port_keeper(directory, loop):
    """A PortMapKeeper running in `loop` when `map-ports` saved mappings, else None."""
    try:
        state = load_portmap(directory)
    except UsageError as exc:
        log.warning("port mappings not kept: %s", exc)
        return None
    if state is None:
        return None
    keeper = PortMapKeeper(directory, state)
    keeper.start(loop)
    return keeper


def cmd_check(args):
    """Ask the server to probe this pod's public address on every port;
    print REACH=direct or relayed (STATUS=online or offline, the original's
    spelling of the same), ADDRESS, TIME."""
    setup = read_setup(PodFiles(args.dir))
    answer = api_for_setup(setup).check(setup.id, check_facts(setup, args.router))
    direct, checked = answer.get("status") == "direct", answer.get("checked_at")
    print_fields(("STATUS", "online" if direct else "offline"),
                 ("ADDRESS", printable(answer.get("address", ""), 100)),
                 ("TIME", iso_time(checked) if type(checked) is int and 0 <= checked < 2 ** 40 else ""),
                 ("REACH", "direct" if direct else "relayed"),
                 ("CGNAT", "yes" if answer.get("cgnat") else None))
    if not direct:
        log.info("not directly reachable, consumers go through the server: %s",
                 answer.get("reason"))
    return 0


def check_facts(setup, ask_router):
    """What `check` tells the server: the router's external address (saved by
    map-ports, or asked by NAT-PMP) and, when every local port equals its
    public port, this pod's LAN address (for split-horizon DNS)."""
    facts, state, gateway = {}, load_portmap(setup.files.dir), default_gateway()
    external = state["external_address"] if state else None
    if external is None and ask_router and gateway:
        try:
            external = natpmp_external_address(gateway, CHECK_ROUTER_TIMEOUT_S)
        except PortMapError as exc:
            log.debug("router did not tell its external address: %s", exc)
    if external:
        facts["external_address"] = external
    if gateway and all(s.local_port == s.public_port for s in setup.services()):
        with contextlib.suppress(PortMapError):
            facts["lan_address"] = local_address_toward(gateway)
    return facts


def cmd_map_ports(args):
    """Open the tunnel's public ports on the router (NAT-PMP, else UPnP IGD),
    external port = public port, internal = local port; saved for `start`."""
    setup = read_setup(PodFiles(args.dir))
    mapper = PortMapper(setup.fqdn, method=args.method)
    result = mapper.map_all([(s.local_port, s.public_port) for s in setup.services()], args.lifetime)
    save_portmap(setup.files.dir, mapper, args.lifetime)
    print_fields(("METHOD", result.method), ("EXTERNAL_ADDRESS", result.external_address),
                 ("LEASE_END", iso_time(result.lease_end)),
                 ("PORTS", ",".join(str(external) for _, external in result.mappings)))
    return 0


# =====================================================================
# CLI — argument parsing, logging and main(); the entry point
# =====================================================================


# argparse is imported where a parser is built, not at the top: `start`,
# re-executed from compiled code, gets its parsed arguments handed over and
# never builds one (argparse and the parser would be 1.4 MB of pod RSS).
def argument_parser_class():
    """argparse.ArgumentParser whose errors are UsageError (one line, exit 2)."""
    import argparse

    class ArgumentParser(argparse.ArgumentParser):
        """argparse that raises UsageError, so main() prints one line, not the usage."""

        def error(self, message):
            raise UsageError("%s (see %s --help)" % (message, self.prog))

    return ArgumentParser


def add_global_options(parser, top_level):
    """--dir, -v, -q, --silent, -k; on subcommands they only override when given."""
    import argparse

    def default(value):
        return value if top_level else argparse.SUPPRESS
    parser.add_argument("--dir", default=default(os.environ.get(DIR_ENV) or os.getcwd()),
                        help="pod directory (default: $%s or the current directory)" % DIR_ENV)
    parser.add_argument("-v", "--verbose", action="count", default=default(0),
                        help="log more (debug)")
    parser.add_argument("-q", "--quiet", action="store_true", default=default(False),
                        help="log warnings and errors only")
    parser.add_argument("--silent", action="store_true", default=default(False),
                        help="write nothing to stderr, not even the error line")
    parser.add_argument("-k", "--insecure", action="store_true", default=default(False),
                        help="setup: do not verify the server's TLS certificate")


def positive_seconds(text):
    """argparse type: a number of seconds above 0."""
    import argparse
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError("expected seconds above 0, got %r" % text)
    return seconds


def build_parser():
    """The command line: global options and one subcommand per command."""
    parser = argument_parser_class()(
        prog="pipe2me_pod.py", description="pipe2me pod: publish local TCP services "
        "through a pipe2me server.", epilog="Exit codes: 0 ok, 2 usage, 3 unavailable, "
        "4 rejected, 130 interrupted.")
    add_global_options(parser, top_level=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def command(name, func, help_text):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_global_options(sub, top_level=False)
        sub.set_defaults(func=func)
        return sub

    setup = command("setup", cmd_setup, "create a tunnel and this pod's key and certificate")
    setup.add_argument("-s", "--server", help="server URL: http(s)://HOST[:PORT] or HOST[:PORT]")
    setup.add_argument("--auth", "--token", dest="auth", help="auth token from the server")
    setup.add_argument("--protocols", default=",".join(DEFAULT_PROTOCOLS),
                       help="comma list of %s (default: %%(default)s)" % ",".join(SERVICE_PROTOCOLS))
    setup.add_argument("--local-ports", "--ports", dest="local_ports",
                       help="comma list of local targets, one per protocol: PORT, HOST:PORT, "
                       "[IPV6]:PORT or NAME:PORT (default: the public ports)")
    setup.add_argument("--proxy-protocol", metavar="v1|v2|off",
                       help="send the consumer's address to tcp and https services in a "
                       "PROXY protocol header (default: off)")
    setup.add_argument("--cacert", help="verify the server with the CA certificates in FILE")
    command("env", cmd_env, "print the settings as shell variables")
    command("verify", cmd_verify, "print the FQDN and exit 0 while the tunnel exists and has "
            "not expired")
    start = command("start", cmd_start, "run the tunnel in the foreground")
    start.add_argument("--echo", action="store_true", help="also run echo services on the local ports")
    start.add_argument("--stop-grace", type=positive_seconds, default=STOP_GRACE_S, metavar="S",
                       help="how long SIGTERM lets running streams finish (default %(default)s)")
    start.add_argument("--connect-timeout", type=positive_seconds, default=LOCAL_CONNECT_TIMEOUT_S,
                       metavar="S", help="how long a local service may take to accept a connection "
                       "(and its name to resolve) before the stream is reset (default %(default)s)")
    start.add_argument("--hello-timeout", type=positive_seconds, default=HELLO_TIMEOUT_S, metavar="S",
                       help="how long the server may take to greet before a new dial (default %(default)s)")
    start.add_argument("--reconnect-delay", type=positive_seconds, default=RECONNECT_FIRST_S, metavar="S",
                       help="the first wait before dialing again, doubled each time (default %(default)s)")
    start.add_argument("--on-cert-change", metavar="CMD",
                       help="run CMD (through /bin/sh) each time a new publicly trusted certificate is written")
    command("status", cmd_status, "whether start runs and is connected (exit 0 only then)")
    update = command("update", cmd_update, "refresh the settings and renew the certificate")
    update.add_argument("--auth", "--token", dest="auth", help="extend the tunnel with this token")
    update.add_argument("--proxy-protocol", metavar="v1|v2|off",
                        help="change the PROXY protocol setting (applies from the next session)")
    check = command("check", cmd_check, "ask the server to probe this pod's public address")
    check.add_argument("--no-router", dest="router", action="store_false",
                       help="do not ask the router (NAT-PMP) for its external address")
    map_ports = command("map-ports", cmd_map_ports, "open the public ports on the router")
    map_ports.add_argument("--method", choices=PORTMAP_METHODS, default="auto",
                           help="natpmp, upnp, or auto: NAT-PMP, then UPnP IGD (default)")
    map_ports.add_argument("--lifetime", type=int, default=PORTMAP_LIFETIME_S, metavar="SECONDS",
                           help="lease to ask for, renewed by `start` at half (default %(default)s)")
    clear = command("clear", cmd_clear, "delete the tunnel on the server and the local files")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    service = command("service", cmd_service, "print a service definition that runs start at boot")
    kinds = service.add_mutually_exclusive_group(required=True)
    for kind in ("systemd", "procd", "sysv"):
        kinds.add_argument("--" + kind, action="store_true", help="for %s" % kind)
    return parser


def handed_over_arguments():
    """The arguments hand_over_arguments() passed to this process (only `start`
    re-executes itself), or None."""
    text = os.environ.pop(ARGS_VARIABLE, None)
    if text is None:
        return None
    return types.SimpleNamespace(func=cmd_start, **json.loads(text))


def main(argv=None):
    """Run one command; return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    silent = "--silent" in argv
    try:
        args = handed_over_arguments() or build_parser().parse_args(argv)
        silent = args.silent
        log.level = LOG_LEVELS["SILENT" if args.silent else "WARNING" if args.quiet
                               else "DEBUG" if args.verbose else "INFO"]
        return args.func(args)
    except Pipe2meError as exc:
        code, message = exc.exit_code, str(exc)
    except KeyboardInterrupt:
        code, message = EXIT_INTERRUPTED, "interrupted"
    if not silent:
        sys.stderr.write("pipe2me: %s\n" % message.translate(CONTROL_ESCAPES))  # peer text too
    return code


if __name__ == "__main__":
    sys.exit(main())
