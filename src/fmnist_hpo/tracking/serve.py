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
GRACEFUL_SECONDS = 1


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


def store_missing(tracking_uri: str) -> bool:
    return tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file()


def prepare_store(tracking_uri: str, create: bool) -> None:
    """A missing SQLite store is an error unless create says to start an empty one."""
    if not store_missing(tracking_uri):
        return
    if not create:
        raise ServeError(f"{tracking_uri}: no MLflow store here yet (run `fmnist run` first, pass --create to start "
                         "an empty one, or --tracking-uri)")
    from fmnist_hpo.tracking.store import create_store

    create_store(tracking_uri)


def server_command(tracking_uri: str, host: str, port: int) -> list[str]:
    # MLflow's host-header and CORS middleware stay at their defaults; nothing here loosens them.
    # One uvicorn worker serves one local user; open browser connections get a second to close on stop.
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
            "--host", host, "--port", str(port), "--workers", "1",
            "--uvicorn-opts", f"--timeout-graceful-shutdown {GRACEFUL_SECONDS}"]


def server_environment() -> dict[str, str]:
    # MLflow's job runner (seven huey consumers, about 1.5 GB) serves GenAI jobs such as scorers;
    # model-training runs never use it
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def display_url(host: str, port: int) -> str:
    shown_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # where this machine reaches "every interface"
    return f"http://{f'[{shown_host}]' if ':' in shown_host else shown_host}:{port}"


def runs_page(url: str, experiment_id: str | None) -> str:
    """The UI page of an experiment's training runs (or the experiment list), in the model-training view.

    MLflow's UI opens on its GenAI view unless the address (or the browser's last choice) says
    workflowType=machine_learning.
    """
    page = f"experiments/{experiment_id}/runs" if experiment_id else "experiments"
    return f"{url}/#/{page}?workflowType=machine_learning"


def wait_until_up(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServeError(f"mlflow server exited with code {process.returncode}: {last_line(log)} (log: {log})")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    stop(process)
    raise ServeError(f"mlflow server did not answer at {url} within {STARTUP_SECONDS} s: {last_line(log)} (log: {log})")


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else "no output"


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=GRACEFUL_SECONDS + 4)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# Kills the server's process group once its parent (fmnist serve-ui) is gone, however it went: SIGKILL
# and a closed terminal included. It waits for the end of its stdin, a pipe only the parent holds open.
WATCHDOG = """# fmnist serve-ui watchdog
import os, select, signal, sys, time
group = int(sys.argv[1])
def alive():
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
while alive():
    if select.select([0], [], [], 1.0)[0] and not os.read(0, 1):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + 5
            while alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        break
"""


def start_watchdog(server: subprocess.Popen) -> subprocess.Popen:
    """A process that stops the server's whole group when this one dies; closing its stdin releases it."""
    return subprocess.Popen([sys.executable, "-c", WATCHDOG, str(server.pid)], stdin=subprocess.PIPE,
                            start_new_session=True)  # out of the terminal's group: a SIGHUP there spares it


def check_host(host: str) -> None:
    if not host.strip():
        raise ServeError("--host '': give an address to bind: 127.0.0.1 (this machine only), 0.0.0.0 or :: "
                         "(every interface)")


def serve_ui(tracking_uri: str, host: str, port: int, on_ready: Callable[[str, Path], None], *,
             create: bool = False, experiment: str | None = None) -> int:
    """Run the server in the foreground until Ctrl-C or SIGTERM; returns the exit code for the CLI.

    on_ready gets the runs page to open (experiment's, else the most recent sweep's) and the server
    log, which is removed on a clean stop and kept (and named in the error) when the server fails.
    """
    check_host(host)
    prepare_store(tracking_uri, create)
    check_port_free(host, port)
    from fmnist_hpo.tracking.reader import experiment_to_show

    page = runs_page(display_url(host, port), experiment_to_show(tracking_uri, experiment))
    log = Path(tempfile.mkstemp(prefix="fmnist-serve-ui-", suffix=".log")[1])
    with log.open("w") as sink:
        process = subprocess.Popen(server_command(tracking_uri, host, port), stdout=sink, stderr=subprocess.STDOUT,
                                   env=server_environment(), start_new_session=True)
    watchdog = start_watchdog(process)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        wait_until_up(display_url(host, port), process, log)
        on_ready(page, log)
        code = process.wait()
        if code != 0:
            raise ServeError(f"mlflow server stopped with code {code}: {last_line(log)} (log: {log})")
    except KeyboardInterrupt:
        pass
    finally:
        stop(process)
        watchdog.stdin.close()
        watchdog.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.unlink(missing_ok=True)
    return 0
