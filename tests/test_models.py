"""serve-ui, evaluate, predict and register against a small sweep on synthetic data."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_raw
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from fmnist_hpo.cli.app import app
from fmnist_hpo.data.datasets import FASHION_MNIST, FILES
from fmnist_hpo.data.idx import read_idx
from fmnist_hpo.modelops.inference import predict_logits
from fmnist_hpo.modelops.inputs import load_image
from fmnist_hpo.training.checkpoints import load_model

runner = CliRunner()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict:
    """A finished 2-trial sweep (best model logged) in its own folder, as a user would have it."""
    folder = tmp_path_factory.mktemp("sweep")
    # fp32 even where auto trains in bf16 (CPUs with AVX512-BF16 or AMX): evaluate re-scores in fp32
    raw = tiny_raw(data_dir, experiment="served", train={"epochs": 2, "precision": "fp32"},
                   search={"max_evals": 2, "space": {"model.filters": {"choice": [4, 8]}}},
                   mlflow={"log_model": "best"})
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "fmnist_hpo", "run", str(spec), "--quiet"], cwd=folder,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("served").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("fmnist.role") == "sweep")
    return {"folder": folder, "uri": uri, "client": client, "parent": parent, "runs": runs,
            "best": parent.data.tags["selected_run_id"], "data_dir": data_dir}


@pytest.fixture
def in_sweep_folder(sweep: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.chdir(sweep["folder"])
    return sweep


def test_evaluate_matches_a_direct_computation(in_sweep_folder: dict, tmp_path: Path):
    sweep = in_sweep_folder
    png = tmp_path / "cm.png"
    result = runner.invoke(app, ["evaluate", sweep["best"], "--tracking-uri", sweep["uri"], "--png", str(png),
                                 "--data-root", str(sweep["data_dir"]), "--log"])
    assert result.exit_code == 0, result.stderr
    images = read_idx(next(sweep["data_dir"].glob(FILES["test_images"] + "*")))
    labels = read_idx(next(sweep["data_dir"].glob(FILES["test_labels"] + "*"))).astype(np.int64)
    model = load_model(Path("models/served") / f"{sweep['best']}.pt")
    predicted = predict_logits(model, images, FASHION_MNIST).argmax(1).numpy()
    accuracy = float((predicted == labels).mean())
    assert f"test accuracy {accuracy:.4f}" in result.stdout
    recall_0 = float((predicted[labels == 0] == 0).mean())
    assert f"{FASHION_MNIST.classes[0]:<12}" in result.stdout and f"{recall_0:>8.4f}" in result.stdout
    matrix = result.stdout.split("columns: predicted class)\n")[1].splitlines()
    assert matrix[0].split() == ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                                 "Bag", "Ankle"]  # every column named by one word, every row in full
    assert [line[:12].strip() for line in matrix[1:11]] == list(FASHION_MNIST.classes)
    assert int(matrix[1].split()[1]) == int(((labels == 0) & (predicted == 0)).sum())
    assert Image.open(png).format == "PNG"
    run = sweep["client"].get_run(sweep["best"])
    assert run.data.metrics["eval_test_accuracy"] == pytest.approx(accuracy)
    assert run.data.metrics["test_accuracy"] == accuracy  # CPU fp32: the logged score is exactly the re-evaluated one
    assert [a.path for a in sweep["client"].list_artifacts(sweep["best"], "evaluation")] == ["evaluation/cm.png"]


def test_evaluate_best_of_an_experiment_and_a_bad_target(in_sweep_folder: dict, tmp_path: Path):
    sweep = in_sweep_folder
    result = runner.invoke(app, ["evaluate", "--experiment", "served", "--best", "--tracking-uri", sweep["uri"],
                                 "--png", str(tmp_path / "b.png"), "--data-root", str(sweep["data_dir"])])
    assert result.exit_code == 0 and sweep["best"] in result.stdout
    bad = runner.invoke(app, ["evaluate", "nonsense-run", "--tracking-uri", sweep["uri"]])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1
    assert "neither a checkpoint file nor a run" in bad.stderr


def test_predict_images_and_idx(in_sweep_folder: dict, tmp_path: Path):
    sweep = in_sweep_folder
    images = read_idx(next(sweep["data_dir"].glob(FILES["test_images"] + "*")))
    checkpoint = Path("models/served") / f"{sweep['best']}.pt"
    expected = predict_logits(load_model(checkpoint), images[:2], FASHION_MNIST).softmax(1)
    gray = tmp_path / "gray.png"
    Image.fromarray(images[0]).save(gray)
    colour = tmp_path / "colour.jpg"  # a dark-on-light colour photo three times the size
    Image.fromarray(255 - images[1]).resize((84, 84), Image.Resampling.NEAREST).convert("RGB").save(colour, quality=100)
    result = runner.invoke(app, ["predict", str(checkpoint), str(gray), str(colour)])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    top = expected.argmax(1).tolist()
    assert lines[0].startswith(f"{gray}: {FASHION_MNIST.classes[top[0]]}")
    assert f"{FASHION_MNIST.classes[top[0]]} {expected[0].max():.3f}" in lines[0]
    # the dark-on-light JPEG comes back as the light-on-dark original (inverted, shrunk), up to JPEG's loss;
    # a model trained for one epoch on 400 images has near-ties, so its class is checked on what was loaded
    loaded = load_image(colour, FASHION_MNIST)
    assert np.corrcoef(loaded.ravel(), images[1].ravel())[0, 1] > 0.9  # not inverted: that would be near -1
    loaded_top = int(predict_logits(load_model(checkpoint), loaded[None], FASHION_MNIST).argmax())
    assert lines[1].startswith(f"{colour}: {FASHION_MNIST.classes[loaded_top]}")
    idx_file = str(next(sweep["data_dir"].glob(FILES["test_images"] + "*")))
    idx = runner.invoke(app, ["predict", sweep["best"], "--idx", idx_file, "--tracking-uri", sweep["uri"], "--limit", "3"])
    assert idx.exit_code == 0, idx.stderr
    lines = idx.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == [f"{Path(idx_file).name}[{i}]" for i in range(3)]
    assert lines[3] == f"... {len(images) - 3} more not shown (--limit 0 prints all)"
    labels = read_idx(next(sweep["data_dir"].glob(FILES["test_labels"] + "*")))  # found beside the images
    right = int((predict_logits(load_model(checkpoint), images, FASHION_MNIST).argmax(1).numpy() == labels).sum())
    assert lines[4].startswith(f"accuracy {right / len(images):.4f} ({right} of {len(images)} images right; labels: ")
    everything = runner.invoke(app, ["predict", str(checkpoint), "--idx", idx_file, "--limit", "0"])
    assert len(everything.stdout.strip().splitlines()) == len(images) + 1  # every image, then the accuracy
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    bad = runner.invoke(app, ["predict", str(checkpoint), str(not_image)])
    assert bad.exit_code == 2 and "not a readable image" in bad.stderr


def test_register_moves_the_champion_alias_and_reuses_a_runs_version(in_sweep_folder: dict):
    sweep = in_sweep_folder
    first = runner.invoke(app, ["register", "--experiment", "served", "--name", "tiny-cnn", "--tracking-uri", sweep["uri"]])
    second = runner.invoke(app, ["register", "--experiment", "served", "--name", "tiny-cnn", "--tracking-uri", sweep["uri"]])
    assert first.exit_code == 0 and second.exit_code == 0, first.stderr + second.stderr
    assert first.stdout.startswith("registered tiny-cnn version 1 ")
    assert second.stdout.startswith("already registered as tiny-cnn version 1 ")
    client = sweep["client"]
    assert [int(v.version) for v in client.search_model_versions("name = 'tiny-cnn'")] == [1]
    champion = client.get_model_version_by_alias("tiny-cnn", "champion")
    assert int(champion.version) == 1 and champion.run_id == sweep["best"]
    best_run = client.get_run(sweep["best"])
    assert float(champion.tags["test_accuracy"]) == pytest.approx(best_run.data.metrics["test_accuracy"])
    assert float(champion.tags["kept_val_accuracy"]) == pytest.approx(best_run.data.metrics["kept_val_accuracy"])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str, payload: dict | None = None) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def start_server(folder: Path, uri: str, port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fmnist_hpo", "serve-ui", "--tracking-uri", uri,
                             "--port", str(port), *extra], cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_page(process: subprocess.Popen) -> tuple[str, Path]:
    """The runs page and server log serve-ui prints when the server answers (after its at-once 'starting' line)."""
    starting = process.stdout.readline()
    assert starting.startswith("starting MLflow for "), starting + process.stderr.read()
    line = process.stdout.readline()
    assert line.startswith("MLflow UI at "), line + process.stderr.read()
    return line.split()[3], Path(line.split("server log ")[1].split(",")[0])


def base_of(page: str) -> str:
    return page.split("/#/")[0]


@pytest.fixture(scope="module")
def server(sweep: dict):
    port = free_port()
    process = start_server(sweep["folder"], sweep["uri"], port)
    try:
        page, _ = wait_for_page(process)
        yield {"base": base_of(page), "page": page, "port": port, "pid": process.pid}
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


def test_serve_ui_answers_the_rest_api(sweep: dict, server: dict, tmp_path: Path):
    api = f"{server['base']}/api/2.0/mlflow"
    experiment = get_json(f"{api}/experiments/get-by-name?experiment_name=served")["experiment"]
    runs = get_json(f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    roles = sorted(next(t["value"] for t in r["data"]["tags"] if t["key"] == "fmnist.role") for r in runs)
    assert roles == ["sweep", "trial", "trial"]
    history = get_json(f"{api}/metrics/get-history?run_id={sweep['best']}&metric_key=val_loss")["metrics"]
    assert [m["step"] for m in history] == [0, 1]
    url = f"{server['base']}/get-artifact?path=checkpoint/{sweep['best']}.pt&run_uuid={sweep['best']}"
    with urllib.request.urlopen(url, timeout=30) as response:
        (tmp_path / "downloaded.pt").write_bytes(response.read())
    payload = torch.load(tmp_path / "downloaded.pt", weights_only=True)
    assert set(payload["state_dict"]) == set(load_model(tmp_path / "downloaded.pt").state_dict())


def test_a_second_server_on_the_same_port_fails_in_one_line(sweep: dict, server: dict):
    second = subprocess.run([sys.executable, "-m", "fmnist_hpo", "serve-ui", "--tracking-uri", sweep["uri"],
                             "--port", str(server["port"])], capture_output=True, text=True, timeout=60)
    assert second.returncode == 2 and second.stderr.count("\n") == 1
    assert "already in use" in second.stderr


def test_the_ui_page_shows_the_runs_in_a_browser(sweep: dict, server: dict, tmp_path: Path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    experiment_id = sweep["client"].get_experiment_by_name("served").experiment_id
    page = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000", "--dump-dom",
         f"{server['base']}/#/experiments/{experiment_id}/runs"],
        capture_output=True, text=True, timeout=180)
    assert sweep["parent"].info.run_name in page.stdout, page.stderr[-800:]  # trials are nested under it


def test_serve_ui_links_the_latest_sweeps_runs_in_the_training_view(sweep: dict, server: dict):
    experiment_id = sweep["client"].get_experiment_by_name("served").experiment_id
    assert server["page"] == f"{server['base']}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def descendants(pid: int) -> list[str]:
    """Command lines of every process below pid."""
    table = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in table.splitlines()]
    found, frontier = [], {str(pid)}
    while frontier:
        children = [r for r in rows if len(r) == 3 and r[1] in frontier]
        found += [r[2] for r in children]
        frontier = {r[0] for r in children}
    return found


def test_serve_ui_starts_only_the_server_and_one_worker(server: dict):
    commands = [c for c in descendants(server["pid"]) if "serve-ui watchdog" not in c]
    assert len(commands) == 2, commands  # `mlflow server` and its one uvicorn worker: no job runner
    assert not any("huey" in c or "_job_runner" in c for c in commands)


def test_serve_ui_stops_on_sigterm_within_seconds_and_removes_its_log(sweep: dict):
    import http.client

    port = free_port()
    process = start_server(sweep["folder"], sweep["uri"], port)
    page, log = wait_for_page(process)
    assert log.is_file()
    browser = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # a keep-alive connection, as a browser holds
    browser.request("GET", "/health")
    assert browser.getresponse().read() == b"OK"
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    stopped_after = time.monotonic() - start
    browser.close()
    assert process.returncode == 0 and stopped_after < 5, stopped_after
    assert page.startswith(f"http://127.0.0.1:{port}/#/") and not log.exists()
    time.sleep(0.5)
    with socket.socket() as probe:  # no one listens on the port any more: the mlflow server went with it
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        probe.listen()


def test_serve_ui_without_a_store_is_a_clear_error(tmp_path: Path):
    result = runner.invoke(app, ["serve-ui", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "no MLflow store here yet" in result.stderr and "--create" in result.stderr
    assert not (tmp_path / "none.db").exists()


def test_serve_ui_names_an_unknown_experiment_in_one_line(sweep: dict):
    result = runner.invoke(app, ["serve-ui", "--tracking-uri", sweep["uri"], "--experiment", "nope",
                                 "--port", str(free_port())])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "unknown experiment 'nope'" in result.stderr and "served" in result.stderr


def test_serve_ui_create_starts_on_a_new_store_and_cleans_up(tmp_path: Path):
    port = free_port()
    uri = f"sqlite:///{tmp_path}/fresh.db"
    process = start_server(tmp_path, uri, port, "--create")
    try:
        page, log = wait_for_page(process)
        assert page == f"http://127.0.0.1:{port}/#/experiments?workflowType=machine_learning"
        assert get_json(f"{base_of(page)}/api/2.0/mlflow/experiments/search", {"max_results": 10})["experiments"]
        assert log.is_file()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert process.returncode == 0 and (tmp_path / "fresh.db").is_file()
    assert not log.exists()  # the server log goes with a clean stop


def test_serve_ui_on_a_file_that_is_no_store_is_one_line(tmp_path: Path):
    (tmp_path / "notes.db").write_text("not a database")
    result = runner.invoke(app, ["serve-ui", "--tracking-uri", f"sqlite:///{tmp_path}/notes.db", "--port", str(free_port())])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "not a readable MLflow store" in result.stderr
