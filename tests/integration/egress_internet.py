"""The "internet" of the egress tests: servers run inside a network namespace the tests create.

Started as `ip netns exec NS python3 egress_internet.py DIR`. DIR holds ca.pem, api.pem, api.key and the wheel.
  :8080  HTTP: a package index (/simple/sbxdemo/, /files/<wheel>), /big (1 MiB), anything else 200 "hello"
  :8443  HTTPS (certificate for api.test from the test CA): 200 "hello over tls"
  :9000  TCP: writes "raw\\n" and closes (a port no policy allows)
Prints "ready" once all three listen. Nothing here reaches beyond the namespace.
"""
from __future__ import annotations

import hashlib
import http.server
import os
import socket
import socketserver
import ssl
import sys
import threading

DIR = sys.argv[1]
WHEEL = next(f for f in os.listdir(DIR) if f.endswith(".whl"))
BIG = b"x" * (1 << 20)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.rstrip("/") == "/simple/sbxdemo":
            data = open(os.path.join(DIR, WHEEL), "rb").read()
            body = (f'<html><body><a href="/files/{WHEEL}#sha256={hashlib.sha256(data).hexdigest()}">'
                    f'{WHEEL}</a></body></html>').encode()
            kind = "text/html"
        elif self.path == f"/files/{WHEEL}":
            body, kind = open(os.path.join(DIR, WHEEL), "rb").read(), "application/octet-stream"
        elif self.path == "/big":
            body, kind = BIG, "application/octet-stream"
        else:
            body, kind = (b"hello over tls" if isinstance(self.connection, ssl.SSLSocket) else b"hello"), "text/plain"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def raw(lst: socket.socket) -> None:
    while True:
        c, _ = lst.accept()
        c.sendall(b"raw\n")
        c.close()


plain = Server(("0.0.0.0", 8080), Handler)
tls = Server(("0.0.0.0", 8443), Handler)
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(os.path.join(DIR, "api.pem"), os.path.join(DIR, "api.key"))
tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
lst = socket.create_server(("0.0.0.0", 9000))
for target in (plain.serve_forever, tls.serve_forever, lambda: raw(lst)):
    threading.Thread(target=target, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
