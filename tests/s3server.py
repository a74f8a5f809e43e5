"""A real S3 server on 127.0.0.1 for the object-store tests and benchmarks: moto's, in a child process.

No pytest here, so benchmark scripts can import it. `S3Server().start()` runs this file as a process
serving moto on a free port; `env` is the environment that points skd (obstore) at it (dummy keys,
plain http). The server counts the requests it serves (method, path), can add a delay to each, and can
turn credential checks on (moto accepts any key by default).

A child process, not moto's ThreadedMotoServer in this one: zarrs keeps the GIL while it waits on some
requests (a shard's size before a partial read), so a server in the reading process never answers it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

DUMMY_KEY, DUMMY_SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
CONTROL = "/_skd"  # the wrapper's own endpoints: requests (GET: the list, DELETE: clear), delay (POST: seconds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 on 127.0.0.1:PORT in a child process."""

    def __init__(self, delay: float = 0.0):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.initial_delay = delay
        self.process: subprocess.Popen | None = None
        self.env = {
            "AWS_ACCESS_KEY_ID": DUMMY_KEY,
            "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    def start(self, timeout: float = 60.0) -> S3Server:
        self.process = subprocess.Popen(
            [sys.executable, __file__, str(self.port), str(self.initial_delay)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._control("GET", "requests")
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the S3 server on port {self.port} did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _control(self, method: str, what: str, body: bytes | None = None):
        request = urllib.request.Request(f"{self.endpoint}{CONTROL}/{what}", data=body, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every S3 request served since the last `clear`."""
        return [tuple(r) for r in self._control("GET", "requests")]

    def clear(self) -> None:
        self._control("DELETE", "requests")

    def set_delay(self, seconds: float) -> None:
        """Answer every later request `seconds` late (a far-away store)."""
        self._control("POST", "delay", str(seconds).encode())

    def client(self):
        """A boto3 S3 client on this server (for buckets and tampering in tests)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=DUMMY_KEY,
            aws_secret_access_key=DUMMY_SECRET,
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def check_credentials(self, on: bool) -> tuple[str, str]:
        """Turn moto's signature checks on (returns an IAM user's key id and secret, made while they were
        off) or off again."""
        import boto3

        keys = ("", "")
        if on:
            iam = boto3.client(
                "iam",
                endpoint_url=self.endpoint,
                region_name="us-east-1",
                aws_access_key_id=DUMMY_KEY,
                aws_secret_access_key=DUMMY_SECRET,
            )
            name = f"skd{time.monotonic_ns()}"
            iam.create_user(UserName=name)
            everything = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
            policy = iam.create_policy(PolicyName=name, PolicyDocument=json.dumps(everything))["Policy"]["Arn"]
            iam.attach_user_policy(UserName=name, PolicyArn=policy)
            key = iam.create_access_key(UserName=name)["AccessKey"]
            keys = key["AccessKeyId"], key["SecretAccessKey"]
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=b"0" if on else b"inf",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(request, timeout=10).close()
        return keys


def serve(port: int, delay: float) -> None:
    """The child: moto's app behind a wrapper that counts, delays and answers CONTROL requests."""
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = DomainDispatcherApplication(create_backend_app)
    state = {"delay": delay, "requests": []}
    lock = threading.Lock()

    def wrapped(environ, start_response):
        path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
        if path.startswith(CONTROL + "/"):
            what = path[len(CONTROL) + 1 :]
            with lock:
                if what == "delay" and method == "POST":
                    state["delay"] = float(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
                elif what == "requests" and method == "DELETE":
                    state["requests"] = []
                body = json.dumps(state["requests"] if what == "requests" else state["delay"]).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if not path.startswith("/moto-api"):
            with lock:
                state["requests"].append((method, path))
            if state["delay"]:
                time.sleep(state["delay"])
        return app(environ, start_response)

    server = make_server("127.0.0.1", port, wrapped, threaded=True, request_handler=MotoRequestHandler)
    server.serve_forever()


if __name__ == "__main__":
    os.environ.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "true")
    serve(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
