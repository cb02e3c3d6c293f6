"""tables.py: every row of every table is a valid train.py command that sets what the row says."""
import pytest

import tables
import train


@pytest.mark.parametrize("name", sorted(tables.TABLES))
def test_every_row_parses_into_its_config(name):
    rows = tables.table_rows(name)
    assert len(rows) >= 5 and len({tables.slug(r) for r, _ in rows}) == len(rows)  # distinct run folders
    for row, over in rows:
        over = dict(over)
        model = over.pop("model")
        tcfg, mcfg = train.parse_args(["--model", model, *tables.flags(over)])
        assert tcfg.model == model
        for k, v in over.items():
            assert getattr(mcfg, k) == v, (name, row, k)


def test_ecgan_rows_are_table3_and_mean_spread():
    import ecgan
    assert [r for r, _ in tables.table_rows("ecgan3")] == list(ecgan.TABLE3)
    assert tables.mean_spread([0.5, 0.7]) == "0.600 ± 0.100"
    assert tables.mean_spread([None]) == "n/a"


def test_write_table_puts_the_papers_numbers_beside_each_row(tmp_path):
    import types
    info = types.SimpleNamespace(name="synthetic", height=32, width=64)
    for name in sorted(tables.TABLES):
        rows = tables.table_rows(name)
        assert len(tables.PAPER[name]) == len(rows), name
        results = [{"row": row, "model": over.get("model", "x"), "flags": "",
                    "runs": [{"seed": s, "train_s": 10.0 + s,
                              "metrics": {"mIoU": 0.5 + 0.1 * s, "pixel accuracy": 0.9,
                                          "FID (segmenter features)": 3.0}} for s in (0, 1)]}
                   for row, over in rows]
        tables.write_table(name, results, tmp_path, 10, [0, 1], "test segmenter", info, 8, [])
        lines = (tmp_path / f"table_{name}.md").read_text().splitlines()
        body = [l for l in lines if l.startswith("| ") and not l.startswith("| row")]
        assert len(body) == len(rows)
        for line, paper in zip(body, tables.PAPER[name]):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[2] == "0.550 ± 0.050" and cells[5] == "10"  # mean ± half-range; mean train seconds
            assert cells[6] == " / ".join("-" if v is None else str(v) for v in paper)


@pytest.mark.slow
@pytest.mark.parametrize("args,pattern", [
    (["lggan9", "--budget_steps", "0"], r"--budget_steps 0: expected"),
    (["lggan9", "--budget_steps", "2", "--height", "48"], r"48x96 .*divisible by"),  # before the segmenter trains
    (["ecgan3", "--budget_steps", "2", "--vgg", "{t}/missing.pth"], r"--vgg .*missing\.pth"),
    (["lggan9", "--budget_steps", "2", "--dataset", "coco", "--dataroot", "{t}/missing"], r"missing: dataset root"),
])
def test_cli_bad_input_gets_one_line(tmp_path, args, pattern):
    from test_data import run_cli
    out = tmp_path / "out"
    run_cli("tables.py", [a.format(t=tmp_path) for a in args] + ["--out", out], out, pattern)
