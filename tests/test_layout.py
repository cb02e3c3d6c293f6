"""The model files copy out alone: gaugan.py, lggan.py, ecgan.py, sau.py (+ segmenter.py, G_l's network) import
only each other, torch and the standard library, and each prints its parameter table from a folder holding
nothing else."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILES = ("gaugan.py", "lggan.py", "ecgan.py", "sau.py", "segmenter.py")
ALLOWED = {"torch"} | {f[:-3] for f in MODEL_FILES}
KEY_LINES = {  # file -> a line of its parameter table (the paper's count where there is one)
    "gaugan.py": "| cityscapes upsample=sau | generator | 93.40 | Table 12: 93.4 |",
    "lggan.py": "| crossview | generator | 12.18 |",
    "ecgan.py": "| cityscapes | label generator (frozen) | 0.44 |",
    "sau.py": "| sau | 93.4M | 93.40M | 93.65M |",
}


def imported_modules(path):
    """Top-level names of every module a file imports, anywhere in it (functions and try blocks included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            names.add("__import__")  # a dynamic import cannot be checked: not allowed either
    return names


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_files_import_only_torch_each_other_and_stdlib(name):
    outside = {m for m in imported_modules(ROOT / name) if m not in ALLOWED and m not in sys.stdlib_module_names}
    assert not outside, f"{name} imports {sorted(outside)}: a model file imports only torch and {sorted(ALLOWED)}"


def test_import_check_sees_imports_inside_functions(tmp_path):
    # the check above must fail on what it is there to catch: a lazy script import
    f = tmp_path / "m.py"
    f.write_text("import torch\n\ndef f():\n    import eval as evaluation\n    from data import DataInfo\n")
    assert imported_modules(f) - {"torch"} == {"eval", "data"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(KEY_LINES))
def test_model_file_prints_its_table_from_a_folder_of_model_files_only(tmp_path, name):
    for f in MODEL_FILES:
        shutil.copy(ROOT / f, tmp_path / f)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    # -S -s would also drop torch's site-packages; PYTHONPATH unset and cwd = the copy keep the repo out of reach
    r = subprocess.run([sys.executable, name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert KEY_LINES[name] in r.stdout.splitlines(), r.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py") == sorted(MODEL_FILES)


def test_dataset_info_matches_data_datainfo():
    # the parameter tables' stand-in for data.DataInfo gives the models the same channel counts
    import data
    import gaugan
    for args in [("c", 35, False, True, 256, 512), ("a", 150, True, False, 256, 256), ("o", 182, True, True, 64, 64),
                 ("v", 6, False, False, 256, 256, "crossview")]:
        ours, theirs = gaugan.dataset_info(*args), data.DataInfo(*args)
        for field in ("name", "num_classes", "dontcare", "has_instance", "height", "width", "task", "label_nc",
                      "input_nc"):
            assert getattr(ours, field) == getattr(theirs, field), (args, field)
