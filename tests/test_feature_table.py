"""The feature table of nbs/tutorials/feature_comparison.ipynb stays true: every torchebm name it lists imports, and every row
says yes/partial/no for each library, with import paths exactly where torchebm has the feature."""
import importlib
import json
import re
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / 'nbs' / 'tutorials' / 'feature_comparison.ipynb'
HEADER = ['Feature', 'TorchEBM 0.8.9', 'ebmkit 0.16', 'torchebm', 'torchebm import']
VERDICT = re.compile(r'^(yes|no|partial \(.+\))$')


def table_rows():
    """The rows of the one markdown table in the notebook, as lists of stripped cells (header and rule dropped)."""
    cells = json.loads(NOTEBOOK.read_text())['cells']
    lines = [line for c in cells if c['cell_type'] == 'markdown'
             for line in ''.join(c['source']).splitlines() if line.startswith('|')]
    rows = [[cell.strip() for cell in line.strip().strip('|').split('|')] for line in lines]
    assert rows[0] == HEADER, f"unexpected table header {rows[0]}"
    return rows[2:]


def listed_names():
    return [name for row in table_rows() for name in re.findall(r'`(torchebm\.[\w.]+)`', row[4])]


def test_table_is_well_formed():
    rows = table_rows()
    assert len(rows) >= 30
    for row in rows:
        assert len(row) == 5, f"row {row[0]!r} has {len(row)} columns, expected 5"
        for verdict in row[1:4]: assert VERDICT.match(verdict), f"row {row[0]!r}: {verdict!r} is not yes/no/partial (...)"
        has_names = bool(re.findall(r'`(torchebm\.[\w.]+)`', row[4]))
        assert has_names == (row[3] != 'no'), f"row {row[0]!r}: torchebm says {row[3]!r} but lists {row[4]!r}"
        if not has_names: assert row[4] == '—'


@pytest.mark.parametrize('name', listed_names())
def test_listed_name_imports(name):
    module, attribute = name.rsplit('.', 1)
    assert hasattr(importlib.import_module(module), attribute), f"{name} is listed in the feature table but missing"
