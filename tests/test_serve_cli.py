"""`lmforge serve` as a user runs it: a process on 127.0.0.1 serving a real llama2.c model
(stories260K from the shared data), answering as the engine does, and stopping cleanly."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED
from serve_fixtures import request

from lmforge.engine import Engine, SamplingParams, end_of_text_ids
from lmforge.loading import load

STORIES = SHARED / "weights" / "stories260K" / "stories260K.bin"
LMFORGE = str(Path(sys.executable).parent / "lmforge")


@pytest.fixture(scope="module")
def served():
    proc = subprocess.Popen([LMFORGE, "serve", "--model", str(STORIES), "--port", "0", "--max-batch", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # printed once the socket listens
    assert line.startswith("lmforge: serving stories260K at http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
    base = line.split(" at ")[1].split("/v1")[0]
    yield proc, base
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_serve_answers_as_the_engine_and_stops_on_sigterm(served):
    proc, base = served
    status, _, data = request(base, "POST", "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0})
    assert status == 200
    model = load(STORIES)
    engine = Engine(model, model.tokenizer)
    ref = engine.generate(["Once upon a time"], max_new_tokens=40, sampling=SamplingParams(temperature=0),
                          stop_ids=end_of_text_ids(model.tokenizer))[0]
    answer = json.loads(data)
    assert answer["choices"][0]["text"] == ref.text and answer["model"] == "stories260K"
    assert "Once upon a time" not in answer["choices"][0]["text"]  # no echo unless asked
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn shuts down, then re-raises the signal it caught


def test_check_loads_binds_and_exits(tmp_path):
    out = subprocess.run([LMFORGE, "serve", "--model", str(STORIES), "--port", "0", "--check"], capture_output=True, text=True, check=False,
                         timeout=120)
    assert out.returncode == 0 and "loads" in out.stdout and "not serving (--check)" in out.stdout
    with socket.create_server(("127.0.0.1", 0)) as taken:  # a port in use: a one-line error, not a traceback
        port = taken.getsockname()[1]
        busy = subprocess.run([LMFORGE, "serve", "--model", str(STORIES), "--port", str(port)], capture_output=True, text=True, check=False,
                              timeout=120)
    assert busy.returncode == 2 and busy.stderr.startswith("lmforge: error: cannot listen on 127.0.0.1:") and "Traceback" not in busy.stderr
