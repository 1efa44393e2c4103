"""nbdkit Python plugin: an NBD export that forwards every NBD request to an
ovirt-imageio transfer URL as one HTTP request.

This is the upload path virt-v2v takes with `-o rhv-upload` (nbdcopy -> nbdkit
Python plugin -> imageio), rebuilt for bench/upload so that the benchmark can
measure the cost of one HTTP request per NBD request at a given nbdcopy
request size:

  pwrite  -> PUT /images/TICKET?flush=n   Content-Range: bytes A-B/*
             (flush=y when the request carries FUA)
  zero    -> PATCH {"op": "zero", "offset": A, "size": N, "flush": false}
  flush   -> PATCH {"op": "flush"}
  pread   -> GET with Range: bytes=A-B
  extents -> answered from one GET /images/TICKET/extents per connection

Usage:
  nbdkit -U SOCK python bench/imageio_plugin.py url=https://HOST:PORT/images/TICKET \\
      [cafile=CA.pem] [insecure=1] [size=BYTES] [max_request=SIZE] [unix=auto|never]

  url          the transfer URL (https:// or http://)
  cafile       CA certificate(s) that signed the server's certificate; without
               it the system trust store is used
  insecure=1   do not verify the server's certificate or host name
  size         the image size in bytes; without it the size is the end of the
               last extent of GET .../extents (what the imageio client does),
               which costs one more request per connection
  max_request  the maximum NBD request size advertised to clients (default
               32M, nbdcopy's own limit). Advisory only with the versions
               bench/upload was written against: nbdkit 1.32 accepts requests
               up to its own 64 MiB limit whatever is declared, and nbdcopy
               1.14 sends its --request-size without looking at it (8 MiB
               requests work with or without the declaration)
  unix=auto    (default) when OPTIONS advertises `unix_socket` and the URL's
               host is this machine, move the connection to that socket, as
               the rhv-upload plugin and the imageio client do; unix=never
               keeps every request on the URL's transport

Threading: one HTTP connection per NBD connection, requests on a connection
serialized (THREAD_MODEL_SERIALIZE_REQUESTS); NBD clients get parallelism from
several connections: multi-conn is advertised when OPTIONS allows more than
one writer (reader, for a read-only client), so nbdcopy opens its default
number (min(4, CPUs)), which gives the server as many HTTP connections, each
with one request in flight - the shape of the rhv-upload plugin's pool.

When a connection closes, one line of statistics goes to stderr (the nbdkit
log): the number of requests and bytes of each kind, so that a benchmark can
tell how many HTTP requests a copy took.
"""

import errno
import http.client
import json
import os
import socket
import ssl
import sys
import time
import urllib.parse

import nbdkit

API_VERSION = 2

_cfg = {
    "url": None,
    "cafile": None,
    "insecure": False,
    "size": None,
    "max_request": 32 * 1024 * 1024,
    "unix": "auto",
}
_url = None  # urllib.parse result of _cfg["url"]


def thread_model():
    # Requests of one NBD connection share its HTTP connection, so they must
    # not overlap; different NBD connections run in parallel.
    return nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS


def config(key, value):
    if key in ("url", "cafile"):
        _cfg[key] = value
    elif key == "insecure":
        _cfg["insecure"] = value.lower() in ("1", "y", "yes", "true", "on")
    elif key == "size":
        _cfg["size"] = nbdkit.parse_size(value)
    elif key == "max_request":
        _cfg["max_request"] = nbdkit.parse_size(value)
    elif key == "unix":
        if value not in ("auto", "never"):
            raise RuntimeError("unix must be auto or never")
        _cfg["unix"] = value
    else:
        raise RuntimeError(f"unknown parameter {key!r}")


def config_complete():
    global _url
    if not _cfg["url"]:
        raise RuntimeError("url=https://HOST:PORT/images/TICKET is required")
    _url = urllib.parse.urlsplit(_cfg["url"])
    if _url.scheme not in ("http", "https") or not _url.hostname:
        raise RuntimeError(f"url must be http(s)://HOST[:PORT]/images/TICKET, not {_cfg['url']!r}")
    if _cfg["max_request"] < 4096:
        raise RuntimeError("max_request must be at least 4096")


class UnixHTTPConnection(http.client.HTTPConnection):
    """Plain HTTP over a Unix socket (imageio's local data socket)."""

    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        # the daemon reports an abstract socket with a leading NUL, which
        # Python's AF_UNIX addressing understands as-is
        s.connect(self.unix_path)
        self.sock = s


def _tcp_connection():
    timeout = 120
    if _url.scheme == "https":
        if _cfg["insecure"]:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context(cafile=_cfg["cafile"])
        return http.client.HTTPSConnection(_url.hostname, _url.port or 443, timeout=timeout,
                                           context=ctx)
    return http.client.HTTPConnection(_url.hostname, _url.port or 80, timeout=timeout)


def _is_this_host(host):
    if host in ("localhost", "127.0.0.1", "::1"):
        return True
    try:
        return host in (socket.gethostname(), socket.getfqdn())
    except OSError:
        return False


class Handle:
    def __init__(self, readonly):
        self.readonly = readonly
        self.path = _url.path
        self.con = _tcp_connection()
        self.transport = _url.scheme
        self.extents_cache = None
        self.stats = {}
        self.last_body = b""
        self.started = time.monotonic()
        self._options()
        self.size = _cfg["size"]
        if self.size is None:
            ext = self.all_extents()
            self.size = ext[-1]["start"] + ext[-1]["length"] if ext else 0

    def _options(self):
        res = self.request("OPTIONS", self.path, what="options", count=0)
        allow = {m.strip() for m in res.getheader("allow", "").split(",")}
        body = json.loads(self.last_body or b"{}") if res.status == 200 else {}
        self.features = set(body.get("features", []))
        # absent keys mean one connection only (what the imageio client assumes)
        self.max_writers = body.get("max_writers", 1)
        self.max_readers = body.get("max_readers", 1)
        self.can_put = "PUT" in allow
        sock = body.get("unix_socket")
        if sock and _cfg["unix"] == "auto" and _is_this_host(_url.hostname):
            self.con.close()
            self.con = UnixHTTPConnection(sock, 120)
            self.transport = "unix"

    def request(self, method, url, body=None, headers=None, what=None, into=None, count=None):
        """Sends one request and reads the whole response (keep-alive).

        into: a writable buffer the response body is read into (GET); other
        bodies are kept in self.last_body. count: the image bytes the request
        covers, for the statistics (default: the body's or the buffer's size).
        Raises on a status >= 300.
        """
        headers = dict(headers or {})
        n = 0 if body is None else len(body)
        self.con.putrequest(method, url, skip_accept_encoding=True)
        if body is not None:
            headers["Content-Length"] = str(n)
        for k, v in headers.items():
            self.con.putheader(k, v)
        # headers and body go out in separate sends; http.client's connect
        # sets TCP_NODELAY, so the body does not wait for a delayed ack
        self.con.endheaders()
        if n:
            self.con.send(body)
        res = self.con.getresponse()
        if res.status >= 300 or into is None:
            self.last_body = res.read()
            if res.status >= 300 and not (method == "OPTIONS" and res.status == 405):
                msg = self.last_body.decode(errors="replace").strip()
                nbdkit.set_error(errno.EIO)
                raise RuntimeError(f"{method} {url}: HTTP {res.status} {res.reason}: {msg}")
        else:
            view = memoryview(into)
            got = 0
            while got < len(view):
                k = res.readinto(view[got:])
                if not k:
                    break
                got += k
            rest = res.read()
            if got != len(view) or rest:
                nbdkit.set_error(errno.EIO)
                raise RuntimeError(f"{method} {url}: expected {len(view)} bytes, got "
                                   f"{got + len(rest)}")
        key = what or method
        c = self.stats.setdefault(key, [0, 0])
        c[0] += 1
        c[1] += count if count is not None else (n if into is None else len(into))
        return res

    def all_extents(self):
        if self.extents_cache is None:
            self.request("GET", self.path + "/extents", what="extents", count=0)
            self.extents_cache = json.loads(self.last_body)
        return self.extents_cache

    def close(self):
        wall = time.monotonic() - self.started
        parts = [f"{k} {c} ({b / (1 << 20):.1f} MiB)" for k, (c, b) in sorted(self.stats.items())]
        line = (f"imageio_plugin: connection closed after {wall:.3f} s over {self.transport}: "
                f"{', '.join(parts) or 'no requests'}\n")
        # one write(2) per line: connections closing at the same moment must
        # not interleave their lines in the log (print writes the newline
        # separately)
        os.write(sys.stderr.fileno(), line.encode())
        self.con.close()


def open(readonly):
    return Handle(readonly)


def close(h):
    h.close()


def get_size(h):
    return h.size


def block_size(h):
    # imageio accepts any alignment (the server does read-modify-write), so
    # the minimum is 1. The maximum tells well-behaved clients how much one
    # request (one HTTP request here) may carry.
    return (1, 4096, _cfg["max_request"])


def can_write(h):
    return not h.readonly and h.can_put


def can_zero(h):
    return "zero" in h.features


def can_flush(h):
    return "flush" in h.features


def can_trim(h):
    return False


def can_multi_conn(h):
    # Every connection reaches the same image and a flush on any of them
    # flushes the server's whole backend, so multi-conn is safe; it is offered
    # only when the server advises more than one writer (reader), so that a
    # client like nbdcopy then uses one connection, as the imageio client
    # does (the daemon advises one writer for a regular file).
    return (h.max_readers if h.readonly else h.max_writers) > 1


def can_extents(h):
    return "extents" in h.features


def pread(h, buf, offset, flags):
    end = offset + len(buf) - 1
    h.request("GET", h.path, headers={"Range": f"bytes={offset}-{end}"}, what="GET", into=buf)


def pwrite(h, buf, offset, flags):
    end = offset + len(buf) - 1
    flush = "y" if flags & nbdkit.FLAG_FUA else "n"
    h.request("PUT", f"{h.path}?flush={flush}", body=buf,
              headers={"Content-Range": f"bytes {offset}-{end}/*"}, what="PUT")


def zero(h, count, offset, flags):
    msg = json.dumps({"op": "zero", "offset": offset, "size": count,
                      "flush": bool(flags & nbdkit.FLAG_FUA)}).encode()
    h.request("PATCH", h.path, body=msg, headers={"Content-Type": "application/json"},
              what="PATCH zero", count=count)


def flush(h, flags):
    msg = json.dumps({"op": "flush"}).encode()
    h.request("PATCH", h.path, body=msg, headers={"Content-Type": "application/json"},
              what="PATCH flush", count=0)


def extents(h, count, offset, flags):
    end = offset + count
    out = []
    for e in h.all_extents():
        s, ln = e["start"], e["length"]
        if s + ln <= offset:
            continue
        if s >= end:
            break
        kind = (nbdkit.EXTENT_ZERO if e.get("zero") else 0) | (
            nbdkit.EXTENT_HOLE if e.get("hole") else 0)
        out.append((s, ln, kind))
        if flags & nbdkit.FLAG_REQ_ONE:
            break
    return out
