"""A tiny key-value store over HTTP, keeping its data in its working directory (the store's Directory).

It takes a moment to start, as a database does: the ready condition is what keeps the API waiting for it.
"""

import datetime
import http.server
import json
import os
import sys
import time
from pathlib import Path

PORT = int(os.environ["KHUTULUN_ENDPOINT_PORT"])
DATA = Path.cwd() / "data.json"


def log(message: str) -> None:
    print(f"{datetime.datetime.now().isoformat(timespec='milliseconds')} store: {message}", flush=True)


class Store(http.server.BaseHTTPRequestHandler):
    def answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        items = json.loads(DATA.read_text()) if DATA.exists() else {}
        if self.path == "/health":
            self.answer(200, {"status": "ok", "items": len(items)})
        elif self.path.startswith("/items/") and self.path[7:] in items:
            self.answer(200, {"value": items[self.path[7:]]})
        else:
            self.answer(404, {"error": "no such item"})

    def do_PUT(self) -> None:
        items = json.loads(DATA.read_text()) if DATA.exists() else {}
        items[self.path.removeprefix("/items/")] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        DATA.write_text(json.dumps(items))
        self.answer(200, {"stored": True})

    def log_message(self, format: str, *args: object) -> None:
        pass


log(f"starting; data in {Path.cwd()}")
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 2.0)  # recovering its data, say
if not DATA.exists():
    DATA.write_text(json.dumps({"greeting": "Hello from the store"}))
server = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Store)
log(f"listening on port {PORT}")
server.serve_forever()
