"""The web front: a page built from what the API answers; it finds the API in its rendered config file."""

import configparser
import datetime
import http.server
import json
import os
import urllib.request
from pathlib import Path

config = configparser.ConfigParser()
config.read(Path(os.environ["KHUTULUN_WEB_CONFIG_PATH"]) / "web.conf")
PORT = int(os.environ["KHUTULUN_ENDPOINT_PORT"])
API = config["api"]["url"]


def log(message: str) -> None:
    print(f"{datetime.datetime.now().isoformat(timespec='milliseconds')} web: {message}", flush=True)


class Web(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        with urllib.request.urlopen(API + "/greeting", timeout=5) as answer:
            greeting = json.loads(answer.read())["value"]
        page = f"<!doctype html>\n<title>{config['site']['title']}</title>\n<h1>{greeting}</h1>\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, format: str, *args: object) -> None:
        pass


with urllib.request.urlopen(API + "/health", timeout=5) as answer:
    log(f"starting; the api at {API} answers {answer.status}")
server = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Web)
log(f"listening on port {PORT}")
server.serve_forever()
