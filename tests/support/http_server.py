#!/usr/bin/env python3
"""A controllable HTTP server for attachment URLs in the integration tests (stdlib only).

Routes (GET; anything else is 404):
  /file/<name>            the file <name> from --dir
  /slow/<seconds>/<name>  the same file, but nothing at all (not even the headers) is sent
                          before <seconds> (a float) have passed
  /redirect?to=<url>      302 with Location: <url>
  /status/<code>          an empty answer with that status code
  /big/<bytes>            that many bytes, streamed in 64 KiB pieces, with Content-Length
  /nolength/<bytes>       that many bytes, chunked (Transfer-Encoding: chunked), no length
Every request line ("GET /file/a.pdf HTTP/1.1") is appended to --dir/requests.log as it
arrives, before any waiting. Each request has its own thread, so a slow answer does not hold up
the others. Listens on 127.0.0.1:--port (0: any free port) and prints "READY <port>", then
runs until killed.
"""
import argparse
import os
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PIECE = 64 * 1024


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mbtest-http/1"

    def log_message(self, format, *args):
        pass

    def log_request_line(self):
        with self.server.log_lock:
            with open(os.path.join(self.server.dir, "requests.log"), "a") as f:
                f.write(self.requestline + "\n")

    def do_GET(self):
        self.log_request_line()
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.split("/")[1:]]
        try:
            if parts[0] == "file" and len(parts) == 2:
                return self.send_file(parts[1])
            if parts[0] == "slow" and len(parts) == 3:
                time.sleep(float(parts[1]))
                return self.send_file(parts[2])
            if parts[0] == "redirect":
                to = urllib.parse.parse_qs(url.query).get("to", [""])[0]
                return self.send_empty(302, [("Location", to)])
            if parts[0] == "status" and len(parts) == 2:
                return self.send_empty(int(parts[1]))
            if parts[0] == "big" and len(parts) == 2:
                return self.send_big(int(parts[1]), chunked=False)
            if parts[0] == "nolength" and len(parts) == 2:
                return self.send_big(int(parts[1]), chunked=True)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        except ValueError:
            return self.send_empty(400)
        self.send_empty(404)

    def send_empty(self, code, headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_file(self, name):
        if "/" in name or name in ("", ".", ".."):
            return self.send_empty(404)
        path = os.path.join(self.server.dir, name)
        try:
            with open(path, "rb") as f:
                body = f.read()
        except OSError:
            return self.send_empty(404)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_big(self, size, chunked):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(size))
        self.end_headers()
        piece = b"0123456789abcdef" * (PIECE // 16)
        left = size
        while left > 0:
            n = min(left, PIECE)
            if chunked:
                self.wfile.write(b"%x\r\n" % n + piece[:n] + b"\r\n")
            else:
                self.wfile.write(piece[:n])
            left -= n
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--dir", required=True)
    a = p.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    server.daemon_threads = True
    server.dir = a.dir
    server.log_lock = threading.Lock()
    print("READY %d" % server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
