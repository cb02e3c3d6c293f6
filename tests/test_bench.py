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

    # component groups: (row label prefix, impls that must all appear, floor row expected); every fast path
    # beside its naive twin and a floor, its "x fast" 1.00 and the floor's "x floor" 1.00
    floor = "floor"
    wanted = [("SAU layer (expanded window)", {"sau_upsample lean", "sau_upsample vectorized", "sau_upsample naive",
                                               "sau_upsample lean, plain autograd"}, True),
              ("SAU layer (input window)", {"sau_upsample lean", "sau_upsample vectorized", "sau_upsample naive"}, True),
              ("Table 12 upsamplers", {"zoo nearest"}, True),
              ("per-class generation, LGGAN G_l", {"naive", "vectorized", "pixel"}, True),
              ("per-class generation, ECGAN G_c", {"naive", "vectorized"}, True),
              ("contrastive Eq. 5", {"vectorized", "naive"}, True),
              ("similarity Eq. 3", {"chunked", "checkpoint", "naive"}, True),
              ("ECGAN step, memory bank", {"with bank (200/class, full)", "without bank"}, False)]
    for prefix, impls, has_floor in wanted:
        got = [cells(line) for line in rows if line.startswith(f"| {prefix}")]
        assert impls <= {c[1] for c in got}, f"bench.py: {prefix} rows {[c[1] for c in got]} miss some of {impls}"
        assert any(c[1].startswith(floor) for c in got) == has_floor, (prefix, [c[1] for c in got])
        assert any(c[4] == "1.00" for c in got), f"bench.py: {prefix} has no fast path (x fast 1.00)"
        if has_floor:
            assert all(c[5] == "1.00" for c in got if c[1].startswith(floor)), got
            assert all(c[5] != "-" for c in got), f"bench.py: {prefix} rows without an x floor ratio"
        for c in got:
            nums = numbers("|" + "|".join(c[2:]) + "|")
            assert nums and all(math.isfinite(x) and x >= 0 for x in nums), c
    for classes in ("35 classes", "150 classes"):
        assert any(classes in line for line in rows if line.startswith("| per-class generation, ECGAN"))
    assert any("extrapolated" in line for line in rows if line.startswith("| contrastive"))
    # the SAU target line: lean's ratio to its floor, per window, with the verdict
    targets = [line for line in lines if "the read-write floor (target <= 3x:" in line]
    assert len(targets) == 2 and all(re.search(r"= \d+\.\d+x the read-write floor .*: (met|MISSED)\)$", t)
                                      for t in targets), targets

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


def test_peak_memory_counts_what_is_live_at_once():
    # closed forms: two 4 MB tensors alive together peak at 8 MB; three made and dropped in turn at 4 MB
    import torch
    mb4 = 1000 * 1000 * 4

    def together():
        a = torch.empty(1000, 1000)
        b = a + 1
        return b.sum()

    def in_turn():
        for _ in range(3):
            torch.empty(1000, 1000).fill_(1)
    assert mb4 * 2 <= bench.peak_memory(together, "cpu") < mb4 * 2 + 4096
    assert mb4 <= bench.peak_memory(in_turn, "cpu") < mb4 + 4096


def test_sau_lean_peak_memory_below_vectorized():
    # the point of "lean": no C k^2 s^2 H W intermediate
    import torch
    import sau
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 16, 16, generator=g, requires_grad=True)
    kern = torch.softmax(torch.randn(1, 25, 32, 32, generator=g), 1).requires_grad_()
    grad = torch.randn(1, 16, 32, 32, generator=g)

    def step(impl):
        return lambda: sau.sau_upsample(x, kern, 2, "expanded", impl).backward(grad)

    lean, vec = bench.peak_memory(step("lean"), "cpu"), bench.peak_memory(step("vectorized"), "cpu")
    assert 0 < lean < vec / 5, (lean, vec)
