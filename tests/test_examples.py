"""Each script in examples/ runs end to end, on a tiny model folder and a few steps, and leaves its increment."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import siftune

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"


def _run(command: list[str], tmp_path: Path, timeout_s: float = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def _increment(folder: Path) -> siftune.SparseIncrement:
    increment = siftune.SparseIncrement.load(folder)
    assert increment.num_components > 0 and (folder / "README.md").is_file()
    return increment


def test_the_python_api_example_trains_a_classifier_and_saves_its_increment(tmp_path, tiny_bert_dir):
    out = _run([sys.executable, str(EXAMPLES / "python_api.py"), "--model", tiny_bert_dir, "--steps", "2",
                "--batch-size", "4", "--eval-size", "8", "--output-dir", "out"], tmp_path)
    assert "held-out accuracy" in out
    assert _increment(tmp_path / "out").metadata["task"] == "classification"


def test_the_nf4_example_trains_beside_a_4bit_base(tmp_path, tiny_llama_dir):
    pytest.importorskip("bitsandbytes")
    out = _run([sys.executable, str(EXAMPLES / "nf4_base.py"), "--model", tiny_llama_dir, "--steps", "2",
                "--batch-size", "2", "--eval-size", "4", "--output-dir", "out"], tmp_path)
    assert "beside the nf4 weights" in out
    increment = _increment(tmp_path / "out")
    assert increment.config["storage"] == "delta" and increment.metadata["quantize"] == "nf4"


def test_the_fsdp2_example_trains_under_torchrun_on_two_processes(tmp_path, tiny_llama_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(port), str(EXAMPLES / "fsdp2.py"), "--model", tiny_llama_dir,
                "--steps", "2", "--batch-size", "4", "--output-dir", "out"], tmp_path)
    assert "over 2 ranks" in out
    _increment(tmp_path / "out")


def test_the_trl_example_trains_with_sfttrainer(tmp_path, tiny_llama_dir):
    pytest.importorskip("trl")
    from transformers import AutoTokenizer

    from test_trl import CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.chat_template = CHAT_TEMPLATE  # conversational rows need one
    tokenizer.save_pretrained(tiny_llama_dir)
    out = _run([sys.executable, str(EXAMPLES / "trl_sft.py"), "--model", tiny_llama_dir, "--steps", "2",
                "--batch-size", "2", "--eval-size", "4", "--output-dir", "out"], tmp_path)
    assert "held-out completion loss" in out
    _increment(tmp_path / "out")
