"""tables.py: every row of every table is a valid train.py command that sets what the row says."""
import json
import os
import sys

import pytest
import torch

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


def _run_names(table, height=32, width=64):
    """The run folder of each row of a table (tables.run_dir), in row order."""
    base = ["--dataset", "synthetic", "--height", str(height), "--width", str(width)]
    names = []
    for _, over in tables.table_rows(table):
        over = dict(over)
        model = over.pop("model")
        names.append(tables.run_dir("", model, tables.minimal_over(model, over, base)).name)
    return names


def _fake_runner(calls, crash_at=None):
    """Stands in for train + evaluate: metrics a function of (row, seed), optionally crashing on one run."""
    def run(argv, run_dir, seg_path, num, device, segmenter_ready=None):
        seed = int(argv[argv.index("--seed") + 1])
        row = run_dir.parent.name
        if (row, seed) == crash_at:
            raise RuntimeError("killed mid-table")
        calls.append((row, seed))
        return {"train_s": 1.0, "metrics": {"mIoU": 0.1 * len(calls), "pixel accuracy": 0.5,
                                            "boundary mIoU": 0.3, "class patch SWD": 0.2}}
    return run


def test_a_rerun_skips_finished_runs_and_a_crash_loses_only_the_unfinished_one(tmp_path, monkeypatch, capsys):
    import segmenter_train
    monkeypatch.setattr(segmenter_train, "find_segmenter", lambda *a, **k: (None, "no segmenter (test)"))
    rows = _run_names("lggan9")
    args = ("lggan9", 2, [0, 1, 2], tmp_path)
    kw = dict(height=32, width=64, num=2, device="cpu")
    calls = []
    monkeypatch.setattr(tables, "train_and_measure", _fake_runner(calls, crash_at=(rows[2], 1)))
    with pytest.raises(RuntimeError, match="killed mid-table"):
        tables.run_table(*args, **kw)
    assert calls == [(r, s) for r in rows[:2] for s in (0, 1, 2)] + [(rows[2], 0)]
    saved = sorted(p.parent.parent.name + "/" + p.parent.name for p in tmp_path.glob("runs/*/seed*/result.json"))
    assert saved == sorted(f"{r}/seed{s}" for r, s in calls)  # every finished run kept, nothing else
    assert not list(tmp_path.rglob("*.tmp*"))
    first = {f"{r}/{s}": (tmp_path / "runs" / r / f"seed{s}" / "result.json").read_text() for r, s in calls}
    calls2 = []
    monkeypatch.setattr(tables, "train_and_measure", _fake_runner(calls2))
    capsys.readouterr()
    results = tables.run_table(*args, **kw)
    assert calls2 == [(rows[2], 1), (rows[2], 2)] + [(r, s) for r in rows[3:] for s in (0, 1, 2)]
    assert capsys.readouterr().out.count("skipped") == 7
    assert all((tmp_path / "runs" / k.split("/")[0] / f"seed{k.split('/')[1]}" / "result.json").read_text() == v
               for k, v in first.items())  # finished runs untouched
    assert [len(r["runs"]) for r in results] == [3] * len(rows)
    assert results[0]["runs"][1]["metrics"]["mIoU"] == pytest.approx(0.2)  # read back from the first sitting
    calls3 = []
    monkeypatch.setattr(tables, "train_and_measure", _fake_runner(calls3))
    tables.run_table(*args, **kw)
    assert calls3 == []
    with pytest.raises(ValueError, match=r"seed0/result.json: saved with other settings \(budget_steps\)"):
        tables.run_table("lggan9", 3, [0], tmp_path, **kw)


def test_ties_are_rows_whose_range_overlaps_the_best_one():
    assert tables.tied_for_best([[0.5, 0.6], [0.58, 0.7], [0.2, 0.3]]) == [0, 1]      # best: row 1 (mean 0.64)
    assert tables.tied_for_best([[0.5, 0.6], [0.61, 0.7], [0.2, 0.3]]) == [1]          # no overlap: no tie
    assert tables.tied_for_best([[3.0, 5.0], [4.9, 6.0], [1.0, 2.0]], higher=False) == [2]
    assert tables.tied_for_best([[3.0, 5.0], [4.9, 6.0], [2.0, 3.0]], higher=False) == [0, 2]  # touching counts
    assert tables.tied_for_best([[None], [0.4]]) == [1] and tables.tied_for_best([[None], []]) == []


def test_write_table_shows_new_metrics_and_ties(tmp_path):
    import types
    info = types.SimpleNamespace(name="synthetic", height=32, width=64)
    rows = tables.table_rows("lggan9")
    miou = [[0.30, 0.34], [0.50, 0.60], [0.58, 0.62], [0.40, 0.44], [0.10, 0.12]]
    swd = [[0.2, 0.3], [0.25, 0.26], [0.1, 0.12], [0.5, 0.6], [0.12, 0.19]]
    results = [{"row": row, "model": "lggan", "flags": "", "runs": [
        {"seed": s, "train_s": 5.0, "metrics": {"mIoU": miou[i][s], "class patch SWD": swd[i][s],
                                                "mIoU (real images: segmenter ceiling)": 0.9}} for s in (0, 1)]}
        for i, (row, _) in enumerate(rows)]
    tables.write_table("lggan9", results, tmp_path, 10, [0, 1], "test segmenter", info, 8, [])
    lines = (tmp_path / "table_lggan9.md").read_text().splitlines()
    head = [c.strip() for c in lines[3].strip("|").split("|")]
    assert head[7:] == ["boundary mIoU ↑", "small-object IoU ↑", "patch SWD ↓", "best or tied (ranges overlap)"]
    body = [[c.strip() for c in l.strip("|").split("|")] for l in lines[5:10]]
    assert [b[9] for b in body] == ["0.250 ± 0.050", "0.255 ± 0.005", "0.110 ± 0.010", "0.550 ± 0.050",
                                    "0.155 ± 0.035"]
    assert [b[10] for b in body] == ["-", "mIoU", "mIoU, SWD", "-", "SWD"]
    assert "ceiling): 0.900" in lines[1]
    assert lines[-1].startswith("Ties") and f"mIoU: {rows[1][0]}, {rows[2][0]}" in lines[-1]


@pytest.mark.parametrize("name", sorted(tables.MECHANISMS))
def test_mechanism_rows_parse_and_build_on_the_meta_device(name):
    """Every row of a mechanism table is a train.py command at the default 64x128 that sets what the row says and
    builds (shapes only); the table states its purpose and has distinct run folders."""
    import data
    info = data.make_dataset("synthetic", split="train", size=(64, 128)).info
    rows = tables.table_rows(name)
    assert len(tables.MECHANISMS[name]["purpose"]) > 40 and "read" in tables.MECHANISMS[name]["purpose"].lower()
    assert len(rows) >= 3 and len({tables.slug(r) for r, _ in rows}) == len(rows)
    for row, over in rows:
        over = dict(over)
        model = over.pop("model")
        tcfg, mcfg = train.parse_args(["--model", model, "--height", "64", "--width", "128", *tables.flags(over)])
        assert tcfg.model == model
        for k, v in over.items():
            assert getattr(mcfg, k) == v, (name, row, k)
        with torch.device("meta"):
            G, D = train.MODELS[model].build(mcfg, info)
        assert sum(p.numel() for p in G.parameters()) > 0, (name, row)


def test_mechanism_tables_isolate_their_switch():
    import ecgan
    sau = [(o["upsample"], o.get("sau_window")) for _, o in tables.table_rows("sau_mech")]
    assert sau == [("nearest", None), ("bilinear", None), ("sau", "expanded"), ("sau", "input")]
    edges = tables.table_rows("edges_mech")
    assert edges[0][1] == dict(model="ecgan", **ecgan.TABLE3["E+G_i"])
    grid = {(o["edge_source"], o["eq1_range"]) for _, o in edges[1:]}
    assert grid == {(s, r) for s in ("generated", "canny") for r in ("paper", "half")} and len(edges) == 5
    for _, o in edges[1:]:  # each edge row is Table 3's E+G_i+G_e+G_t plus the two switches, nothing else
        assert {k: v for k, v in o.items() if k not in ("edge_source", "eq1_range", "model")} == \
            ecgan.TABLE3["E+G_i+G_e+G_t"]
    full = dict(model="ecgan", **ecgan.TABLE3["E+G_i+G_e+G_t+G_s+G_l+G_c"])
    assert [o for _, o in tables.table_rows("contrast_mech")] == [full, dict(full, bank_per_class=0),
                                                                  dict(full, use_contrast=False),
                                                                  dict(full, lambda_l=0.0)]  # Eq. 5 alone off
    cg = [o for _, o in tables.table_rows("classgen_mech")]
    assert cg[0] == dict(model="lggan", local=False) and cg[1]["model"] == "lggan" and cg[1].get("local", True)
    assert cg[2:] == [full, dict(full, use_contrast=False)]


def test_mechanism_table_renders_its_purpose_and_extra_column_without_paper_numbers(tmp_path):
    import types
    info = types.SimpleNamespace(name="synthetic", height=64, width=128)
    rows = tables.table_rows("edges_mech")
    results = [{"row": row, "model": "ecgan", "flags": "", "runs": [
        {"seed": s, "train_s": 5.0, "metrics": {"mIoU": 0.5, "edge F1": None if i == 0 else 0.1 * i + 0.01 * s,
                                                "edge F1 (every pixel an edge: baseline)": None if i == 0 else 0.65}}
        for s in (0, 1)]} for i, (row, _) in enumerate(rows)]
    tables.write_table("edges_mech", results, tmp_path, 10, [0, 1], "test segmenter", info, 8, [])
    lines = (tmp_path / "table_edges_mech.md").read_text().splitlines()
    assert lines[2] == "purpose: " + tables.MECHANISMS["edges_mech"]["purpose"]
    assert lines[3] == "edge F1 of an edge map marking every pixel (baseline): 0.650"
    head = [c.strip() for c in lines[5].strip("|").split("|")]
    assert "paper" not in lines[5] and head[6:] == ["boundary mIoU ↑", "small-object IoU ↑", "patch SWD ↓",
                                                    "edge F1 ↑", "best or tied (ranges overlap)"]
    assert lines[6].count("|") == lines[5].count("|")
    body = [[c.strip() for c in l.strip("|").split("|")] for l in lines[7:12]]
    assert [b[9] for b in body] == ["n/a", "0.105 ± 0.005", "0.205 ± 0.005", "0.305 ± 0.005", "0.405 ± 0.005"]
    assert body[4][10] == "mIoU, edgeF1" and body[0][10] == "mIoU"  # all tied on mIoU


def test_mechanism_tables_are_cli_choices(capsys):
    for name in tables.MECHANISMS:
        with pytest.raises(SystemExit):
            tables.main([name])
        assert f"{name}: --budget_steps N is required" in capsys.readouterr().err


def test_undefined_values_are_left_out_of_spreads_and_ties():
    """A metric eval.py could not define (NaN, e.g. the embedding ratio of collapsed embeddings) or did not
    measure (None) counts as missing, not as a value."""
    nan = float("nan")
    assert tables.mean_spread([0.5, nan, None, 0.7]) == "0.600 ± 0.100"
    assert tables.mean_spread([nan, None]) == "n/a"
    assert tables.tied_for_best([[nan], [0.2, 0.3], [0.5, 0.6]], higher=False) == [1]
    assert tables.MECHANISMS["contrast_mech"]["columns"] == [tables.FEAT_RATIO, tables.EMB_RATIO]


def test_tables_share_runs_of_one_configuration_and_defaults_are_dropped():
    sau, g12 = _run_names("sau_mech"), _run_names("gaugan12")
    assert sau[0] == g12[0] == "gaugan_defaults"  # nearest is the default
    assert sau[2] == g12[3] == "gaugan_upsample_sau"
    assert sau[3] == "gaugan_upsample_sau_sau_window_input"
    edges, t3 = _run_names("edges_mech"), _run_names("ecgan3")
    assert edges[0] == t3[0] and edges[1] == t3[2]  # E+G_i; E+G_i+G_e+G_t with the default edges and Eq. 1
    assert len(set(edges)) == len(edges) and len(set(t3)) == len(t3)
    contrast, classgen = _run_names("contrast_mech"), _run_names("classgen_mech")
    assert contrast[0] == t3[-1] == classgen[2] and contrast[2] == t3[-2] == classgen[3]
    assert classgen[:2] == _run_names("lggan9")[:2]


def test_a_claimed_run_is_left_to_its_holder_and_waited_for(tmp_path, monkeypatch):
    """Two tables.py processes at once: a run claimed by a live process is not trained again; the table waits for
    its result. A claim left by a dead process is taken over."""
    import segmenter_train
    import subprocess
    monkeypatch.setattr(segmenter_train, "find_segmenter", lambda *a, **k: (None, "no segmenter (test)"))
    names = _run_names("sau_mech")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for name, pid in ((names[1], holder.pid), (names[2], dead.pid)):
            (tmp_path / "runs" / name).mkdir(parents=True)
            (tmp_path / "runs" / name / "seed0.claim").write_text(str(pid))
        calls, slept = [], []
        monkeypatch.setattr(tables, "train_and_measure", _fake_runner(calls))

        def other_process_finishes(_):  # while this one waits, the holder writes its result
            slept.append(1)
            res = json.loads((tmp_path / "runs" / names[0] / "seed0" / "result.json").read_text())
            res["result"]["metrics"]["mIoU"] = 0.77
            res["settings"]["row_flags"] = ["--upsample", "bilinear"]
            tables._write_json(tmp_path / "runs" / names[1] / "seed0" / "result.json", res)
        monkeypatch.setattr(tables.time, "sleep", other_process_finishes)
        results = tables.run_table("sau_mech", 2, [0], tmp_path, height=32, width=64, num=2, device="cpu")
    finally:
        holder.kill()
        holder.wait()
    assert calls == [(names[0], 0), (names[2], 0), (names[3], 0)] and slept == [1]
    assert results[1]["runs"][0]["metrics"]["mIoU"] == 0.77
    assert not list(tmp_path.rglob("*.claim")) or list(tmp_path.rglob("*.claim")) == [
        tmp_path / "runs" / names[1] / "seed0.claim"]  # only the live holder's own claim is left


def test_sau_fig5_reads_the_sau_rows_checkpoints(tmp_path, capsys):
    """tables.py sau_fig5: Fig. 5's statistic of every finished seed of sau_mech's SAU rows, beside the untrained
    generator; a clear error before sau_mech has run."""
    with pytest.raises(SystemExit):
        tables.main(["sau_fig5", "--out", str(tmp_path)])
    assert "no checkpoint of sau_mech's SAU rows" in capsys.readouterr().err
    names = _run_names("sau_mech")
    for seed in (0, 1):
        train.main(["--model", "gaugan", "--upsample", "sau", "--height", "32", "--width", "64", "--steps", "1",
                    "--batch_size", "2", "--ngf", "8", "--ndf", "8", "--spade_hidden", "8", "--seed", str(seed),
                    "--progress", "false", "--out", str(tmp_path / "runs" / names[2] / f"seed{seed}")])
    rows = tables.sau_kernel_table(tmp_path, num=2, device="cpu")
    assert [r["row"] for r in rows] == ["GauGAN SAU, expanded window"]  # no LGGAN++ run here and len(rows[0]["trained"]) == 2
    assert all(0 < s["all"]["share of window"] < 1 for s in rows[0]["trained"])
    text = (tmp_path / "table_sau_fig5.md").read_text()
    assert "| GauGAN SAU, expanded window | 2 |" in text


def test_paired_lines_compare_rows_seed_by_seed():
    run = lambda seed, v: {"seed": seed, "metrics": {"mIoU": v}}
    results = [{"row": "A", "runs": [run(0, 0.5), run(1, 0.4), run(2, 0.6)]},
               {"row": "B", "runs": [run(0, 0.6), run(1, 0.3), run(2, float("nan"))]},
               {"row": "C", "runs": [run(1, 0.5), run(2, 0.7)]}]
    lines = tables.paired_lines(results, "mIoU")
    assert lines[2] == "- B vs A: seed 0: +0.100, seed 1: -0.100 (higher in 1 of 2)"
    assert lines[3] == "- C vs A: seed 1: +0.100, seed 2: +0.100 (higher in 2 of 2)"
    assert tables.paired_lines(results, "mIoU", [(0, 2)])[2] == "- A vs C: seed 1: -0.100, seed 2: -0.100 (higher in 0 of 2)"
    assert tables.MECHANISMS["classgen_mech"]["pairs"] == [(1, 0), (2, 3)]


def test_remeasure_keeps_the_training_and_replaces_the_metrics(tmp_path, monkeypatch):
    import segmenter_train
    monkeypatch.setattr(segmenter_train, "find_segmenter", lambda *a, **k: (None, "no segmenter (test)"))
    kw = dict(height=32, width=64, num=2, device="cpu")
    calls = []
    monkeypatch.setattr(tables, "train_and_measure", _fake_runner(calls))
    tables.run_table("contrast_mech", 2, [0, 1], tmp_path, **kw)
    assert len(calls) == 8
    measured = []
    monkeypatch.setattr(tables, "measure", lambda run, *a: measured.append(run) or {"mIoU": 0.9, "feature F "
                                                                                   "intra/inter ratio": 0.5})
    calls2 = []
    monkeypatch.setattr(tables, "train_and_measure", _fake_runner(calls2))
    results = tables.run_table("contrast_mech", 2, [0, 1], tmp_path, remeasure=True, **kw)
    assert calls2 == [] and len(measured) == 8  # nothing trained again, every run measured again
    assert all(s["metrics"]["mIoU"] == 0.9 and s["train_s"] == 1.0 for r in results for s in r["runs"])
    saved = json.loads((measured[0] / "result.json").read_text())["result"]
    assert saved["metrics"]["feature F intra/inter ratio"] == 0.5 and saved["train_s"] == 1.0


def test_claim_is_written_whole_and_released(tmp_path):
    """A claim file holds its pid from the moment it exists; a second claim of a live holder fails; a garbled one
    (no pid) is taken over; no temp file is left."""
    path = tmp_path / "seed0.claim"
    assert tables._claim(path) == path and path.read_text() == str(os.getpid())
    assert tables._claim(path) is None  # held by this (live) process
    path.write_text("garbled")
    assert tables._claim(path) == path and path.read_text() == str(os.getpid())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed0.claim"]
