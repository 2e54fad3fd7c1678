"""A local stand-in of the dnsimple v2 API, for tests (http.server in a thread).

It follows the documented request and response shapes of the endpoints
pipe2me uses (https://developer.dnsimple.com/v2/):

    GET    /v2/whoami                                 {"data": {"user": null, "account": {...}}}
    GET    /v2/:account/zones/:zone                   {"data": zone} | 404 {"message": ...}
    GET    /v2/:account/zones/:zone/records           {"data": [...], "pagination": {...}}
           ?page=&per_page= (default 30, at most 100), ?name=, ?type=
    POST   /v2/:account/zones/:zone/records           201 {"data": record}
    PATCH  /v2/:account/zones/:zone/records/:record   200 {"data": record}
    DELETE /v2/:account/zones/:zone/records/:record   204

Every request needs `Authorization: Bearer <token>` (401 {"message":
"Authentication failed"} otherwise); bodies must be JSON with
`Content-Type: application/json` (400 "Validation failed" with `errors`
otherwise). Every answer carries X-RateLimit-Limit/-Remaining/-Reset.

Faults to simulate: `outage` (an HTTP status every request gets, e.g. 503),
`rate_limited_until` (epoch: 429 {"message": "quota exceeded"} with
Remaining 0 until then). `requests` records (method, path) of every request
that passed authentication and faults, `faulted` counts the others;
`mutations()` counts POST/PATCH/DELETE.
"""

import http.server
import json
import re
import threading
import time
import urllib.parse

RATE_LIMIT = 2400
RECORD_TYPES = ("A", "AAAA", "CNAME", "MX", "NS", "SOA", "TXT", "ALIAS", "SRV", "CAA")


class DnsimpleStandin:
    """The fake API on 127.0.0.1:<free port>; use as a context manager."""

    def __init__(self, token, account_id=1010, zones=("example.com",)):
        self.token, self.account_id = token, account_id
        self.zones = {name: {"id": index + 1, "account_id": account_id, "name": name,
                             "reverse": False, "created_at": "2016-01-01T00:00:00Z",
                             "updated_at": "2016-01-01T00:00:00Z"}
                      for index, name in enumerate(zones)}
        self.records = {}          # id -> record
        self.next_id = 100
        self.lock = threading.Lock()
        self.requests = []
        self.outage = None
        self.rate_limited_until = 0
        self.faulted = 0           # requests answered with 401, an outage or 429
        for zone in zones:
            self.add(zone, "", "SOA", "ns1.dnsimple.com admin.dnsimple.com 1 86400 7200 604800 300",
                     system=True)
            self.add(zone, "", "NS", "ns1.dnsimple.com", system=True)
        handler = type("Handler", (StandinHandler,), {"standin": self})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)
        return False

    def add(self, zone, name, rtype, content, ttl=3600, system=False):
        """Create a record directly (as another tool would); returns it."""
        with self.lock:
            self.next_id += 1
            record = {"id": self.next_id, "zone_id": zone, "parent_id": None, "name": name,
                      "content": content, "ttl": ttl, "priority": None, "type": rtype,
                      "regions": ["global"], "system_record": system,
                      "created_at": "2016-01-01T00:00:00Z", "updated_at": "2016-01-01T00:00:00Z"}
            self.records[record["id"]] = record
            return dict(record)

    def find(self, zone, name=None, rtype=None):
        with self.lock:
            return [dict(r) for r in sorted(self.records.values(), key=lambda r: r["id"])
                    if r["zone_id"] == zone and (name is None or r["name"] == name)
                    and (rtype is None or r["type"] == rtype)]

    def mutations(self):
        return sum(1 for method, _ in self.requests if method in ("POST", "PATCH", "DELETE"))


class StandinHandler(http.server.BaseHTTPRequestHandler):
    """Routes one request of the fake API; `standin` is set on a subclass."""

    standin = None
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.dispatch()

    def do_POST(self):
        self.dispatch()

    def do_PATCH(self):
        self.dispatch()

    def do_DELETE(self):
        self.dispatch()

    # -- plumbing -------------------------------------------------------
    def dispatch(self):
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fault = self.fault()
        if fault:
            with self.standin.lock:
                self.standin.faulted += 1
            return self.answer(*fault)
        with self.standin.lock:
            self.standin.requests.append((self.command, url.path))
        try:
            self.answer(*self.route(url.path, query, body))
        except ApiFault as fault:
            self.answer(fault.status, {"message": fault.message, **fault.extra})

    def fault(self):
        standin = self.standin
        if self.headers.get("Authorization") != "Bearer " + standin.token:
            return 401, {"message": "Authentication failed"}
        if standin.outage:
            return standin.outage, {"message": "Service unavailable"}
        if time.time() < standin.rate_limited_until:
            return 429, {"message": "quota exceeded"}
        return None

    def answer(self, status, obj):
        data = b"" if obj is None else json.dumps(obj).encode()
        self.send_response(status)
        limited = time.time() < self.standin.rate_limited_until
        self.send_header("X-RateLimit-Limit", str(RATE_LIMIT))
        self.send_header("X-RateLimit-Remaining", "0" if limited else str(RATE_LIMIT - 1))
        reset = self.standin.rate_limited_until if limited else time.time() + 3600
        self.send_header("X-RateLimit-Reset", str(int(reset)))
        if data:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def json_body(self, body):
        if "application/json" not in self.headers.get("Content-Type", ""):
            raise ApiFault(400, "Validation failed", errors={"content_type": ["must be JSON"]})
        try:
            data = json.loads(body.decode())
        except ValueError:
            raise ApiFault(400, "Validation failed", errors={"body": ["is not JSON"]}) from None
        if not isinstance(data, dict):
            raise ApiFault(400, "Validation failed", errors={"body": ["must be an object"]})
        return data

    # -- endpoints ------------------------------------------------------
    def route(self, path, query, body):
        standin = self.standin
        if path == "/v2/whoami" and self.command == "GET":
            return 200, {"data": {"user": None, "account": {
                "id": standin.account_id, "email": "ops@example.com",
                "plan_identifier": "teams-v1-monthly", "created_at": "2016-01-01T00:00:00Z",
                "updated_at": "2016-01-01T00:00:00Z"}}}
        match = re.fullmatch(r"/v2/(\d+)/zones/([^/]+)(/records(?:/(\d+))?)?", path)
        if not match or int(match.group(1)) != standin.account_id:
            raise ApiFault(404, "Not Found")
        zone = match.group(2)
        if zone not in standin.zones:
            raise ApiFault(404, "Zone `%s` not found" % zone)
        if match.group(3) is None:
            if self.command != "GET":
                raise ApiFault(405, "Method not allowed")
            return 200, {"data": standin.zones[zone]}
        if match.group(4) is None:
            return self.records(zone, query, body)
        return self.record(zone, int(match.group(4)), body)

    def records(self, zone, query, body):
        if self.command == "GET":
            return self.list_records(zone, query)
        if self.command != "POST":
            raise ApiFault(405, "Method not allowed")
        data = self.json_body(body)
        errors = {}
        for key in ("name", "type", "content"):
            if not isinstance(data.get(key), str):
                errors[key] = ["can't be blank"]
        if data.get("type") not in RECORD_TYPES:
            errors["record_type"] = ["unsupported"]
        if "ttl" in data and not isinstance(data["ttl"], int):
            errors["ttl"] = ["is not a number"]
        if errors:
            raise ApiFault(400, "Validation failed", errors=errors)
        record = self.standin.add(zone, data["name"], data["type"], data["content"],
                                  data.get("ttl", 3600))
        return 201, {"data": record}

    def list_records(self, zone, query):
        try:
            page = max(1, int(query.get("page", 1)))
            per_page = min(100, max(1, int(query.get("per_page", 30))))
        except ValueError:
            raise ApiFault(400, "Invalid pagination") from None
        found = self.standin.find(zone, query.get("name"), query.get("type"))
        pages = max(1, -(-len(found) // per_page))
        return 200, {"data": found[(page - 1) * per_page:page * per_page],
                     "pagination": {"current_page": page, "per_page": per_page,
                                    "total_entries": len(found), "total_pages": pages}}

    def record(self, zone, record_id, body):
        standin = self.standin
        with standin.lock:
            record = standin.records.get(record_id)
        if record is None or record["zone_id"] != zone:
            raise ApiFault(404, "Record `%d` not found" % record_id)
        if self.command == "GET":
            return 200, {"data": record}
        if self.command == "DELETE":
            with standin.lock:
                del standin.records[record_id]
            return 204, None
        if self.command != "PATCH":
            raise ApiFault(405, "Method not allowed")
        data = self.json_body(body)
        changes = {k: v for k, v in data.items() if k in ("name", "content", "ttl", "priority")}
        with standin.lock:
            record.update(changes)
            return 200, {"data": dict(record)}


class ApiFault(Exception):
    def __init__(self, status, message, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra
