"""ONNX Runtime sessions draw from one capped arena: a run over the cap fails cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

# The arena is registered once per process, so the cap is set in a fresh interpreter.
SCRIPT = """
import json
import numpy as np
from onnx import TensorProto, helper

import modules.evaluation.inference as inference
from modules.errors import IncompatibleError

inference.ORT_ARENA_MAX_BYTES = 32 * 1024**2

def expand(n):
    shape = helper.make_tensor("S", TensorProto.INT64, [1], [n])
    graph = helper.make_graph(
        [helper.make_node("Expand", ["X", "S"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None])],
        initializer=[shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

x = {"X": np.ones(1, np.float32)}
out = {}
try:
    inference.OrtRunner.of(expand(16 * 1024**2), threads=1).run(x)  # 64 MiB
    out["big"] = "ran"
except IncompatibleError as exc:
    out["big"] = str(exc)
out["small"] = int(inference.OrtRunner.of(expand(1024**2), threads=1).run(x)["Y"].size)
print(json.dumps(out))
"""


def test_a_run_over_the_arena_cap_is_refused_and_the_next_session_still_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["big"].startswith("ONNX Runtime could not run the model on these inputs")
    assert "smaller than requested bytes of 67108864" in out["big"]
    assert out["small"] == 1024**2
