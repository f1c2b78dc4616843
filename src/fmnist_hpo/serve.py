"""`fmnist serve-ui`: MLflow's tracking server and UI on the store the sweeps write to."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from fmnist_hpo.errors import FmnistError

STARTUP_SECONDS = 90


class ServeError(FmnistError):
    """The UI server cannot be started."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # as the server itself will: connections in TIME_WAIT from a just-stopped server do not count
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = "already in use" if exc.errno in (98, 48, 10048) else exc.strerror
            raise ServeError(f"cannot serve on {host}:{port}: {reason}") from None


def check_store(tracking_uri: str) -> None:
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise ServeError(f"{tracking_uri}: no MLflow store here yet (run `fmnist run` first, or pass --tracking-uri)")


def server_command(tracking_uri: str, host: str, port: int) -> list[str]:
    # MLflow's host-header and CORS middleware stay at their defaults; nothing here loosens them
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
            "--host", host, "--port", str(port), "--workers", "1"]


def wait_until_up(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServeError(f"mlflow server exited with code {process.returncode}: {last_line(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    stop(process)
    raise ServeError(f"mlflow server did not answer at {url} within {STARTUP_SECONDS} s: {last_line(log)}")


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else "no output"


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_ui(tracking_uri: str, host: str, port: int, on_ready: Callable[[str, Path], None]) -> int:
    """Run the server in the foreground until Ctrl-C or SIGTERM; returns the exit code for the CLI."""
    check_store(tracking_uri)
    check_port_free(host, port)
    log = Path(tempfile.mkstemp(prefix="fmnist-serve-ui-", suffix=".log")[1])
    with log.open("w") as sink:
        process = subprocess.Popen(server_command(tracking_uri, host, port), stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{f'[{shown_host}]' if ':' in shown_host else shown_host}:{port}"
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        wait_until_up(url, process, log)
        on_ready(url, log)
        code = process.wait()
        if code != 0:
            raise ServeError(f"mlflow server stopped with code {code}: {last_line(log)}")
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        stop(process)
        signal.signal(signal.SIGTERM, previous)
