"""CLI round trips of the scikit-learn compression scripts.

Two run as real `python -m` subprocesses (started together: each takes seconds to import);
the other cases call the same `main(argv)` in-process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from sklearn.ensemble import RandomForestClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from modules.compression import feature_prune, forest_prune, knn_prototypes, precision
from modules.core.artifact import ModelArtifact
from modules.storage.datasets import load_dataset
from modules.storage.model_formats import load_model_file, save_model

ROOT = Path(__file__).resolve().parents[3]


def _negate(x):
    """A function skops would have to import by name: not on the allow-list."""
    return -x


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    digits = load_dataset("digits")
    folder = tmp_path_factory.mktemp("models")
    knn = KNeighborsClassifier().fit(digits.X_train, digits.y_train)
    rf = RandomForestClassifier(n_estimators=10, random_state=0).fit(digits.X_train, digits.y_train)
    untrusted = Pipeline([("f", FunctionTransformer(_negate)), ("m", KNeighborsClassifier())])
    untrusted.fit(digits.X_train, digits.y_train)
    paths = {"knn": folder / "knn.skops", "rf": folder / "rf.skops"}
    for name, est in (("knn", knn), ("rf", rf)):
        paths[name].write_bytes(save_model(ModelArtifact("sklearn", est)))
    paths["untrusted"] = folder / "untrusted.skops"
    paths["untrusted"].write_bytes(sio.dumps(untrusted))
    return paths


def test_subprocess_round_trips(models, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = {
        "ok": ["knn_prototypes", "--input-model", models["knn"], "--output-model", "small.skops",
               "--dataset", "digits", "--ratio", "0.1", "--method", "kmeans", "--timing-runs", "2"],
        "type": ["knn_prototypes", "--input-model", models["rf"], "--output-model", "t.skops",
                 "--ratio", "0.1"],
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", f"modules.compression.{args[0]}", *map(str, args[1:])],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in runs.items()
    }
    done = {name: (*proc.communicate(timeout=300), proc.returncode) for name, proc in procs.items()}

    out, err, code = done["ok"]
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["step"] == "knn_prototypes" and line["output_model"] == "small.skops"
    assert line["output_size"] == (tmp_path / "small.skops").stat().st_size
    assert line["metrics"]["prototypes_after"] < 0.11 * line["metrics"]["prototypes_before"]
    assert isinstance(load_model_file(tmp_path / "small.skops").obj, KNeighborsClassifier)

    out, err, code = done["type"]
    assert code == 2 and out == ""
    assert "error: knn_prototypes needs a KNeighborsClassifier, got RandomForestClassifier" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.skops"]


def test_forest_cli_prints_one_json_line(models, tmp_path, capsys):
    out = tmp_path / "small.skops"
    argv = ["--input-model", str(models["rf"]), "--output-model", str(out), "--n-trees", "3"]
    code = forest_prune.main([*argv, "--ccp-alpha", "0.001", "--sweep-trees", "1,3"])
    line = json.loads(capsys.readouterr().out)
    assert code == 0 and line["metrics"]["trees_after"] == 3
    assert [row["n_trees"] for row in line["metrics"]["sweep"]] == [1, 3]
    assert len(load_model_file(out).obj.estimators_) == 3


@pytest.mark.parametrize(
    "module, source, args, message",
    [
        (forest_prune, "rf", ["--n-trees", "11"], "asked for 11 trees but the forest has 10"),
        (forest_prune, "rf", ["--n-trees", "0"], "n_trees=0"),
        (forest_prune, "rf", ["--n-trees", "2", "--dataset", "iris"], "64 input features"),
        (knn_prototypes, "knn", ["--ratio", "0"], "ratio=0.0"),
        (knn_prototypes, "knn", ["--ratio", "1.5"], "less than or equal to 1"),
        (feature_prune, "knn", ["--keep-ratio", "1.5"], "keep_ratio=1.5"),
        (feature_prune, "rf", ["--method", "coef_magnitude"], "needs a linear model"),
        (precision, "untrusted", ["--dtype", "int8"], "outside the trusted list"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    models, tmp_path, capsys, module, source, args, message
):
    out = tmp_path / "out.skops"
    code = module.main(["--input-model", str(models[source]), "--output-model", str(out), *args])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("error:") and message in captured.err
    assert not out.exists()


def test_argparse_errors_exit_2(models, capsys):
    with pytest.raises(SystemExit) as info:
        knn_prototypes.main(["--input-model", str(models["knn"]), "--ratio", "lots"])
    assert info.value.code == 2 and "invalid float value" in capsys.readouterr().err


def test_feature_and_precision_clis_chain(models, tmp_path, capsys):
    pruned, quantized = tmp_path / "pruned.skops", tmp_path / "int8.skops"
    argv = ["--input-model", str(models["knn"]), "--output-model", str(pruned)]
    assert feature_prune.main([*argv, "--method", "variance", "--keep-ratio", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["features_kept"] == 32
    argv = ["--input-model", str(pruned), "--output-model", str(quantized), "--dtype", "int8"]
    assert precision.main(argv) == 0
    line = json.loads(capsys.readouterr().out)
    assert 0.9 <= line["metrics"]["agreement_with_float32"] <= 1.0
    model = load_model_file(quantized).obj
    assert [name for name, _ in model.steps] == ["select", "quantize", "dequantize", "model"]
    x = load_dataset("digits").X_test
    assert model.predict(x).shape == (len(x),) and np.isin(model.predict(x), range(10)).all()
