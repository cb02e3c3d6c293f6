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
