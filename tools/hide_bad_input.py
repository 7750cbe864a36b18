"""Move the bad-input checks of notebook cells into `#| hide` cells right after them (CONTRIBUTING.md's rule).

A top-level `test_fail(...)` statement in a visible code cell is a bad-input check: it still runs under nbdev_test,
but says nothing to a reader. This moves each such statement (whole statements only; a cell where one shares a line
with other code is left alone and reported) into a hidden cell placed directly after its cell; a cell made only of
them becomes hidden. Outputs stay where they are (`test_fail` prints nothing). Check the prose before each moved
block afterwards ("... and errors:") and run `nbdev_clean` and `nbdev_test --path` on the notebook.

Usage: python tools/hide_bad_input.py nbs/13_langevin.ipynb [more.ipynb ...]
"""
import ast
import json
import sys
import uuid
from pathlib import Path

NOTE = '#| hide\n# bad input: each error names the argument (hidden on the page; nbdev_test runs it)\n'


def _is_bad_input(node) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name) and node.value.func.id == 'test_fail')


def _lines(text: str) -> list: return text.splitlines(True)


def split_cell(source: str):
    "`(kept source, hidden source)` of a cell, `(None, None)` when there is nothing to move or it cannot be split."
    if source.lstrip().startswith('#|'): return None, None
    try: tree = ast.parse(source)
    except SyntaxError: return None, None
    bad = [n for n in tree.body if _is_bad_input(n)]
    if not bad: return None, None
    moved = {l for n in bad for l in range(n.lineno - 1, n.end_lineno)}
    for n in tree.body:
        if n not in bad and moved & set(range(n.lineno - 1, n.end_lineno)): return None, 'shared'
    lines = source.split('\n')
    kept = '\n'.join(l for i, l in enumerate(lines) if i not in moved).strip('\n')
    return kept, '\n'.join(ast.get_source_segment(source, n) for n in bad)


def process(path: Path) -> int:
    nb = json.loads(path.read_text())
    cells, moved = [], 0
    for cell in nb['cells']:
        cells.append(cell)
        if cell['cell_type'] != 'code': continue
        kept, hidden = split_cell(''.join(cell['source']))
        if hidden == 'shared': print(f'{path}: a test_fail shares a line with other code, left alone'); continue
        if hidden is None: continue
        moved += hidden.count('test_fail(')
        if kept.strip():
            cell['source'] = _lines(kept)
            cells.append({'cell_type': 'code', 'execution_count': None, 'id': uuid.uuid4().hex[:8], 'metadata': {},
                          'outputs': [], 'source': _lines(NOTE + hidden)})
        else: cell['source'] = _lines(NOTE + ''.join(cell['source']))
    nb['cells'] = cells
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    return moved


if __name__ == '__main__':
    for arg in sys.argv[1:]: print(f'{arg}: {process(Path(arg))} bad-input checks hidden')
