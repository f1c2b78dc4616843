"""Hostile or oversized input costs no memory, time or traceback: one line, exit 2, refused early."""

from __future__ import annotations

import gzip
import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_raw
from PIL import Image
from typer.testing import CliRunner

from fmnist_hpo.cli.app import app
from fmnist_hpo.config.loading import apply_overrides, to_dict
from fmnist_hpo.config.sections import validate
from fmnist_hpo.data.datasets import FASHION_MNIST
from fmnist_hpo.data.idx import read_idx
from fmnist_hpo.errors import ConfigError, DataError
from fmnist_hpo.modelops.inputs import ImageError, load_image
from fmnist_hpo.training.checkpoints import CheckpointError, load_model, save_checkpoint
from fmnist_hpo.training.model import build_model

runner = CliRunner()


def alias_bomb(levels: int = 9, under: str = "anchors") -> str:
    lines = [f"{under}:", "  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


HOSTILE_SPECS = {
    "alias bomb": (alias_bomb(), "expands to more than 100000 values"),
    "alias bomb under a choice": (alias_bomb() + "search:\n  space:\n    model.filters: {choice: *l8}\n",
                                  "expands to more than 100000 values"),
    "deep nesting": ("train: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 64 levels deep"),
    "a huge list": ("unknown: [" + ", ".join(["1"] * 400_000) + "]\n", "too large to be a spec"),
    "a recursive alias": ("a: &a [*a]\n", "an alias refers to the value that contains it"),
    "a long description": ("description: " + "x" * 20_000 + "\n", "description: at most 10000 characters"),
}


@pytest.mark.parametrize("case", list(HOSTILE_SPECS))
def test_hostile_specs_are_refused_in_one_short_line(case: str, tmp_path: Path):
    text, message = HOSTILE_SPECS[case]
    spec = tmp_path / "hostile.yaml"
    spec.write_text(text)
    result = runner.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr[:500]
    assert message in result.stderr and len(result.stderr) < 300  # never the expanded value


def test_a_hostile_set_value_is_refused_in_one_line(tmp_path: Path, data_dir: Path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_raw(data_dir)))
    result = runner.invoke(app, ["validate", str(spec), "--set", "train.lr=" + "[" * 200 + "]" * 200])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "nested more than 64 levels deep" in result.stderr


@pytest.mark.parametrize(("key", "value", "message"), [
    ("search.seed", -1, "search.seed: must be >= 0, got -1"),
    ("data.split_seed", -1, "data.split_seed: must be >= 0, got -1"),
    ("train.seed", 1e30, "train.seed: must be <= 4.29497e+09"),
    ("train.weight_decay", 1e300, "train.weight_decay: must be <= 1"),
])
def test_values_that_would_crash_later_are_caught_by_validation(key: str, value: float, message: str):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        validate(apply_overrides({}, {key: value}))


def test_the_last_repeat_seed_is_checked_too():
    with pytest.raises(ConfigError, match="with 3 repeats the last seed would pass"):
        validate({"train": {"seed": 2**32 - 2}, "search": {"repeats": 3}})


# --- IDX files: the header first --------------------------------------------------------------------


def idx_header(*shape: int) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, len(shape)) + struct.pack(f">{len(shape)}I", *shape)


def gzip_of_zeros(header: bytes, megabytes: int) -> bytes:
    """header, then megabytes of zeros, gzipped: a few KB on disk."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as handle:
        handle.write(header)
        chunk = bytes(2**20)
        for _ in range(megabytes):
            handle.write(chunk)
    return out.getvalue()


def test_an_idx_header_declaring_too_much_is_refused_before_inflating(tmp_path: Path):
    bomb = tmp_path / "bomb-idx3-ubyte.gz"
    bomb.write_bytes(gzip_of_zeros(idx_header(4_000_000, 28, 28), 8))  # declares 3 GB
    with pytest.raises(DataError, match="its header declares 3136000000 bytes of data, more than"):
        read_idx(bomb)
    wrong = tmp_path / "wrong-idx3-ubyte.gz"
    wrong.write_bytes(gzip_of_zeros(idx_header(5, 64, 64), 1))
    with pytest.raises(DataError, match=r"expected 28x28 images, its header declares shape \(5, 64, 64\)"):
        read_idx(wrong, item_shape=(28, 28))
    trailing = tmp_path / "trailing-idx3-ubyte.gz"  # one image, then 64 MB of padding
    trailing.write_bytes(gzip_of_zeros(idx_header(1, 28, 28), 64))
    with pytest.raises(DataError, match=r"1048576\+ unexpected bytes after the data"):
        read_idx(trailing)


def test_predict_idx_refuses_a_gzip_bomb_in_one_line(tmp_path: Path, data_dir: Path):
    cfg = validate(tiny_raw(data_dir))
    checkpoint = save_checkpoint(tmp_path / "m.pt", build_model(cfg.model, FASHION_MNIST), to_dict(cfg)["model"],
                                 FASHION_MNIST)
    bomb = tmp_path / "bomb-idx3-ubyte.gz"
    bomb.write_bytes(gzip_of_zeros(idx_header(1_000_000, 28, 28), 4))
    result = runner.invoke(app, ["predict", str(checkpoint), "--idx", str(bomb)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "its header declares" in result.stderr


# --- images -------------------------------------------------------------------------------------------


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header claims width x height (its one IDAT chunk is far too short for that)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("size", [(8000, 8000), (30000, 30000)])
def test_decompression_bombs_are_refused_before_decoding(tmp_path: Path, size: tuple[int, int]):
    with pytest.raises(ImageError, match="shrink it first"):
        load_image(png_declaring(tmp_path / "bomb.png", *size), FASHION_MNIST)


# --- checkpoints ------------------------------------------------------------------------------------


def test_a_tiny_checkpoint_declaring_a_huge_model_is_refused_without_allocating(tmp_path: Path):
    huge = {"num_blocks": 6, "filters": 4096, "units1": 16384, "units2": 16384}
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "model_config": huge}, path)
    assert path.stat().st_size < 5000
    code = ("import resource, sys\nfrom fmnist_hpo.training.checkpoints import CheckpointError, load_model\n"
            f"try:\n    load_model({str(path)!r})\nexcept CheckpointError as exc:\n    print(exc)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert "weights do not fit its model config" in out[0]
    assert int(out[1]) < 1500, f"peak memory {out[1]} MB: the declared model was allocated"


def test_a_checkpoint_with_code_is_refused_without_suggesting_weights_only_false(tmp_path: Path):
    import os

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "model_config": RunsCode()}, path)
    with pytest.raises(CheckpointError) as raised:
        load_model(path)
    assert "weights_only" not in str(raised.value) and "could run code when loaded; refused" in str(raised.value)


# --- a model too large for the machine ---------------------------------------------------------------


def test_a_model_too_large_for_the_machine_says_so_before_training(tmp_path: Path, data_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    from fmnist_hpo.training import fits

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fits, "available_bytes", lambda device: 2 * 2**30)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_raw(data_dir)))
    assert runner.invoke(app, ["validate", str(spec)]).exit_code == 0
    huge = ["--set", "model.num_blocks=6", "--set", "model.filters=4096"]
    for command in (["validate", str(spec), *huge], ["run", str(spec), *huge]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "parameters at batch size 32) needs at least" in result.stderr and "2.0 GB free" in result.stderr
    searched = ["--set", "search.space={model.filters: {choice: [8, 4096]}}", "--set", "model.num_blocks=6"]
    result = runner.invoke(app, ["validate", str(spec), *searched])
    assert result.exit_code == 2 and "needs at least" in result.stderr, result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_random_bytes_are_called_damaged_not_dangerous(tmp_path: Path):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(256)) * 16)  # not a zip, not a pickle of tensors
    with pytest.raises(CheckpointError) as raised:
        load_model(path)
    assert "damaged, or not a checkpoint" in str(raised.value) and "could run code" not in str(raised.value)
