"""bench.py --quick (what CI runs): every model row and every component pair is printed with finite numbers."""
import math
import re

import pytest

import bench

NUM = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?|nan|inf"


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def numbers(line):
    """Every numeric cell of a markdown row (labels and notes skipped), as floats."""
    return [float(c) for c in cells(line) if re.fullmatch(NUM, c)]


@pytest.mark.slow
def test_quick_prints_every_row_with_finite_numbers(tmp_path, capsys):
    out = tmp_path / "bench.md"
    lines = bench.main(["--quick", "--reps", "1", "--out", str(out)])
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| model |")
            and not line.startswith("| component |")]
    by_name = {}
    for line in rows:
        by_name.setdefault(cells(line)[0], []).append(line)

    # models: the step-time table and the memory-scale table, one row each per model
    for model in bench.MODELS:
        assert len(by_name.get(model, [])) == 2, f"bench.py: no step/memory rows for {model}: {by_name.keys()}"
    step_rows = {cells(by_name[m][0])[0]: numbers(by_name[m][0]) for m in bench.MODELS}
    assert step_rows["gaugan"][1] == 1.0  # the baseline's ratio to itself
    for model, nums in step_rows.items():
        assert len(nums) >= 5 and all(math.isfinite(x) and x > 0 for x in nums), (model, nums)
    for model in bench.MODELS:
        per_sample, fixed, batch = numbers(by_name[model][1])
        assert per_sample > 0 and fixed > 0 and batch >= 1

    # component pairs: (row label prefix, impls that must all appear)
    wanted = [("SAU layer", {"sau_upsample lean, expanded", "sau_upsample vectorized, expanded", "zoo nearest"}),
              ("per-class generation", {"naive", "vectorized", "pixel"}),
              ("contrastive Eq. 5", {"vectorized", "naive"}),
              ("similarity Eq. 3", {"chunked", "naive"})]
    for prefix, impls in wanted:
        got = [cells(line) for line in rows if line.startswith(f"| {prefix}")]
        assert impls <= {c[1] for c in got}, f"bench.py: {prefix} rows {[c[1] for c in got]} miss some of {impls}"
        for c in got:
            nums = numbers("|" + "|".join(c[2:]) + "|")
            assert nums and all(math.isfinite(x) and x >= 0 for x in nums), c
    for classes in ("35 classes", "150 classes"):
        assert any(classes in line for line in rows if line.startswith("| per-class generation"))
    assert any("extrapolated" in line for line in rows if line.startswith("| contrastive"))

    # the markdown file holds the same tables
    assert out.read_text().splitlines() == lines


@pytest.mark.slow
@pytest.mark.parametrize("args,pattern", [
    (["--size", "30", "64"], r"--size 30 64: expected .*multiples of 32"),
    (["--batch", "0"], r"--batch 0: expected"),
    (["--out", "{t}/nowhere/bench.md"], r"--out .*nowhere/bench\.md: its folder does not exist"),
])
def test_cli_bad_input_gets_one_line(tmp_path, args, pattern):
    from test_data import run_cli
    run_cli("bench.py", [a.format(t=tmp_path) for a in args], tmp_path / "nowhere", pattern)
