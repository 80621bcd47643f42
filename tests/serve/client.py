"""Start `wft serve` as a real process on a free loopback port and talk HTTP to it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request


@contextlib.contextmanager
def running_server(*args: str, timeout: float = 120.0, output: list[str] | None = None):
    """Yield the base URL of `wft serve <args> --port 0`; the port is read from its banner.
    The server's output is read on, so a chatty server never blocks on a full pipe; pass a
    list as `output` to collect its lines."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    process = subprocess.Popen(
        [sys.executable, "-m", "wftool", "serve", *args, "--port", "0", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = [] if output is None else output
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                raise AssertionError("wft serve exited:\n" + "".join(lines))
            lines.append(line)
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            if found:
                break
        else:
            raise AssertionError("wft serve did not start:\n" + "".join(lines))
        base = found.group(1)
        threading.Thread(target=_read_on, args=(process.stdout, lines), daemon=True).start()
        _wait_healthy(base, deadline)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def _read_on(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


def _wait_healthy(base: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise AssertionError("wft serve never became healthy")


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def stream(url: str, body: dict) -> list[dict | str]:
    """The server-sent events of a streamed request: parsed JSON, then the final "[DONE]"."""
    request = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def completion_scope(payload: bytes, path: str = "/v1/completions",
                     method: str = "POST") -> dict:
    """The ASGI scope of a JSON request to `path`, for driving the app directly."""
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": [(b"content-type", b"application/json"),
                                         (b"content-length", str(len(payload)).encode())],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}


def call_app(app, path: str, body: dict | None = None) -> tuple[int, bytes]:
    """One request through the ASGI app in this process, a JSON POST (a GET without
    `body`): its status and whole body."""
    payload = b"" if body is None else json.dumps(body).encode()
    sent, received = [], {"status": None, "body": []}

    async def receive():
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": payload, "more_body": False}
        await asyncio.sleep(3600)  # the client stays until the answer is complete

    async def send(message):
        if message["type"] == "http.response.start":
            received["status"] = message["status"]
        elif message["type"] == "http.response.body":
            received["body"].append(message.get("body", b""))

    scope = completion_scope(payload, path, "GET" if body is None else "POST")
    asyncio.run(app(scope, receive, send))
    return received["status"], b"".join(received["body"])


def events_of(raw: bytes) -> list[dict | str]:
    """The server-sent events of a streamed answer: parsed JSON, then the final "[DONE]"."""
    events = []
    for line in raw.decode().splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
