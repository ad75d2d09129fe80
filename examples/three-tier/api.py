"""The API: answers /greeting with what the store holds, and /health once the store answers."""

import datetime
import http.server
import json
import os
import urllib.request

PORT = int(os.environ["KHUTULUN_ENDPOINT_PORT"])
STORE = "http://" + os.environ["KHUTULUN_STORE_ADDRESS"]


def log(message: str) -> None:
    print(f"{datetime.datetime.now().isoformat(timespec='milliseconds')} api: {message}", flush=True)


def fetch(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.loads(answer.read())


class Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/health":
            body, status = {"status": "ok", "store": fetch(STORE + "/health")}, 200
        elif self.path == "/greeting":
            body, status = fetch(STORE + "/items/greeting"), 200
        else:
            body, status = {"error": "not found"}, 404
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


log(f"starting; the store at {STORE} answers {fetch(STORE + '/health')}")
server = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Api)
log(f"listening on port {PORT}")
server.serve_forever()
