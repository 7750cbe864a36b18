"""Re-execute notebooks headless and save their outputs back (the docs show stored outputs).

Applies the same skips as `nbdev_test`: `#| eval: false` cells, `nbdev_export(` cells, and cells whose
directives name a flag from settings.ini's `tst_flags` that is not forced with `--flags`.
Usage: python tools/run_nbs.py nbs/02_energies.ipynb [more.ipynb ...] [--flags slow]
"""
import argparse, os, sys
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from fastcore.xtras import working_directory
from nbdev.config import get_config
from nbdev.process import NBProcessor
from nbdev.frontmatter import FrontmatterProc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import showdoc  # noqa: E402  (tools/showdoc.py: show_doc signatures as in the code, the same as the docs build)


def _skip_cell(flags):
    def skip(cell):
        if cell.cell_type != 'code': return True
        if 'nbdev_export' + '(' in cell.source: return True
        directives = getattr(cell, 'directives_', {}) or {}
        if directives.get('eval:', [''])[0].lower() == 'false': return True
        return bool(flags & directives.keys())
    return skip


def run_notebook(path: Path, flags: set) -> None:
    "Execute `path` in a fresh shell and write the outputs back into it."
    nb = NBProcessor(path, procs=FrontmatterProc, process=True).nb
    for cell in nb.cells:
        if cell.cell_type == 'code': cell.outputs, cell.execution_count = [], None
    os.environ.setdefault('MPLBACKEND', 'Agg')
    showdoc.patch()
    shell = CaptureShell(path, mpl_format='png')
    with working_directory(path.parent):
        shell.run_all(nb, exc_stop=True, preproc=_skip_cell(flags))
    raw = read_nb(path)
    by_id = {c.get('id'): c for c in nb.cells}
    for cell in raw.cells:
        if cell.cell_type == 'code' and cell.get('id') in by_id:
            cell.outputs = by_id[cell['id']].get('outputs', [])
    write_nb(raw, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('notebooks', nargs='+', type=Path)
    ap.add_argument('--flags', default='', help='space-separated tst_flags to run anyway (e.g. "slow")')
    args = ap.parse_args()
    skip = set(get_config().tst_flags.split()) - set(args.flags.split())
    for path in args.notebooks:
        print(f'running {path}', flush=True)
        run_notebook(path.resolve(), skip)
    return 0


if __name__ == '__main__': sys.exit(main())
