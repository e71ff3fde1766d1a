"""A real S3 endpoint for the tests: moto's server (`ThreadedMotoServer`, as s3fs's own tests use) on 127.0.0.1.

Only the server side is the test's: it can be stopped (the port refuses connections) and started again on the
same port with its objects kept (moto keeps them in this process), and it can hold one kind of request (a
shard's upload) until the test has seen it, to kill a client in the middle of it. revprompt runs unchanged, in
subprocesses, against `AWS_ENDPOINT_URL`.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from typing import Iterator

from moto.server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "revprompt-test-key", "AWS_SECRET_ACCESS_KEY": "revprompt-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server(ThreadedMotoServer):
    """moto's S3 on a fixed local port, restartable, with a gate that can hold matching requests."""

    def __init__(self):
        super().__init__(ip_address="127.0.0.1", port=free_port(), verbose=False)
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request seen
        self._hold: re.Pattern | None = None
        self.held = threading.Event()  # set when a request matching the hold pattern arrived
        self._release = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def env(self) -> dict[str, str]:
        """What a client process needs: the endpoint and (fake) credentials, through the standard variables."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)

        def gate(environ, start_response):
            method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
            self.requests.append((method, path))
            if self._hold is not None and self._hold.search(f"{method} {path}"):
                # the whole upload arrives (exactly its length: the socket stays open); no answer until released
                environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
                self.held.set()
                self._release.wait(120)
                start_response("503 Service Unavailable", [("Content-Length", "0")])
                return [b""]
            return app(environ, start_response)

        for attempt in range(50):  # the port of a server just stopped may take a moment to be free again
            try:
                self._server = make_server(self._ip_address, self._port, gate, True,
                                           request_handler=MotoRequestHandler)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"port {self._port} stayed busy")
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def running(self) -> bool:
        return self._server_ready_event.is_set()

    def start(self) -> None:
        """Serve (again, on the same port, with the objects kept); a no-op while serving."""
        if not self.running:
            super().start()

    def stop(self) -> None:
        """Stop serving and close the listening socket: new connections are refused. A no-op while stopped."""
        if self.running:
            super().stop()
            self._server.server_close()

    def hold(self, pattern: str | None) -> None:
        """Hold every request whose 'METHOD /path' matches `pattern` (None: hold nothing, release the held)."""
        self.held.clear()
        self._release.clear()
        self._hold = re.compile(pattern) if pattern else None
        if pattern is None:
            self._release.set()

    def client(self):
        """A boto3 S3 client of this server (the test's own view of the bucket)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def objects(self, bucket: str, prefix: str) -> dict[str, bytes]:
        """{key below prefix/: bytes} of every object there."""
        client, out = self.client(), {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
            for item in page.get("Contents", []):
                key = item["Key"]
                out[key[len(prefix.rstrip("/")) + 1:]] = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return out


@contextlib.contextmanager
def serving(bucket: str, in_environ: bool = False) -> Iterator[S3Server]:
    """A started server with `bucket`; with `in_environ`, this process's environment points at it meanwhile (for
    in-process fsspec use). Stopped, and the environment restored, afterwards."""
    server = S3Server()
    server.start()
    server.make_bucket(bucket)
    saved = {k: os.environ.get(k) for k in server.env()}
    if in_environ:
        os.environ.update(server.env())
    try:
        yield server
    finally:
        server.hold(None)
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
