#!/usr/bin/env python3
"""The demo appserver: a bottle app answering /hello/<name> with "Hello <name>, I'm <node> !".

Environment:
  APP_NODE        the name it answers with (default: ROLLCALL_NODE, else the host name)
  APP_HOST        address to listen on (default 0.0.0.0)
  APP_PORT        port to listen on (default 8080)
  APP_ACCESS_LOG  0 to stop logging each request to stderr (default 1)

Run it under the node agent, which registers it while it runs:
  rollcall register --role appserver --port 8080 -- python3 app.py

On SIGTERM or SIGINT it stops accepting, finishes the requests in flight and exits 0.
Needs Debian's python3-bottle (apt-get install python3-bottle).
"""

import os
import signal
import socket
import sys
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import bottle

NODE = (
    os.environ.get("APP_NODE")
    or os.environ.get("ROLLCALL_NODE")
    or socket.gethostname().split(".")[0]
)
HOST = os.environ.get("APP_HOST", "0.0.0.0")
PORT = int(os.environ.get("APP_PORT", "8080"))
ACCESS_LOG = os.environ.get("APP_ACCESS_LOG", "1") != "0"

app = bottle.Bottle()


@app.get("/hello/<name>")
def hello(name):
    bottle.response.content_type = "text/plain; charset=utf-8"
    # The address this request came from: the frontserver that passed it on (nginx), so that a
    # client behind hipache can tell which frontserver served it (tests/docker.rs uses it).
    bottle.response.set_header("X-Peer-Addr", bottle.request.environ.get("REMOTE_ADDR", ""))
    return "Hello %s, I'm %s !" % (name, NODE)


@app.get("/health")
def health():
    bottle.response.content_type = "text/plain; charset=utf-8"
    return "ok"


class Server(ThreadingMixIn, WSGIServer):
    """bottle's default server (wsgiref) with a thread per request."""

    daemon_threads = False  # server_close() then waits for the requests in flight
    allow_reuse_address = True
    address_family = socket.AF_INET6 if ":" in HOST else socket.AF_INET


class Handler(WSGIRequestHandler):
    def log_message(self, format, *args):
        if ACCESS_LOG:
            super().log_message(format, *args)


def main():
    httpd = make_server(HOST, PORT, app, server_class=Server, handler_class=Handler)

    def stop(signum, frame):
        # shutdown() waits for serve_forever() to return: call it from another thread.
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("appserver %s listening on %s:%d" % (NODE, HOST, PORT), file=sys.stderr, flush=True)
    httpd.serve_forever()
    httpd.server_close()
    print("appserver %s stopped" % NODE, file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
