"""Build the docs without Quarto: nbdev's pre-render steps, then one HTML page per notebook and README.md.

1. nbdev's own pre-render (what `nbdev_docs` does before `quarto render`): refresh nbdev.yml, rebuild
   the module index, write sidebar.yml and process the notebooks into `_proc/` (show_doc rendered to
   markdown, `#| hide` cells dropped, the title cell turned into front matter).
2. Strip what only Quarto understands: front matter back to a `# title` / `> description` cell, `#|`
   directive lines, inputs of `echo: false` cells, and `{...}` attribute blocks after links.
3. `nbconvert` writes `_docs/<page>.html` (figures embedded as data: PNG) and README.md from index.ipynb
   (figures left out: they are on the docs home page).

Usage: python tools/docs_offline.py   (run from anywhere inside the repository)
"""
import re, shutil, sys, time
from pathlib import Path

import nbformat
import yaml
from nbconvert import HTMLExporter, MarkdownExporter
from traitlets.config import Config
from fastcore.xtras import working_directory
from nbdev.config import get_config
from nbdev.doclinks import _build_modidx
from nbdev.quarto import nbdev_sidebar, refresh_quarto_yml
import nbdev.serve_drv
from nbdev.serve import _proc_file
from nbdev.doclinks import nbglob

FRONT_MATTER = re.compile(r'^---\s*\n(.*?)\n---\s*$', re.S)
ATTRIBUTES = re.compile(r'(\]\([^)]*\))\{[^}]*\}')
NOTEBOOK_LINK = re.compile(r'\]\((?!https?:)([^)#]+)\.ipynb')
DIRECTIVE = re.compile(r'^\s*#\|.*$\n?', re.M)


def _front_matter_to_markdown(text: str):
    "A `---` YAML block as a `# title` / `> description` markdown source, or None."
    m = FRONT_MATTER.match(text.strip())
    if not m: return None
    fields = yaml.safe_load(m.group(1)) or {}
    lines = [f"# {fields['title']}"] if fields.get('title') else []
    if fields.get('description'): lines.append(f"> {' '.join(str(fields['description']).split())}")
    return '\n\n'.join(lines)


def strip_quarto(nb):
    "Rewrite a processed notebook in place so that plain nbconvert shows what Quarto would."
    cells = []
    for cell in nb.cells:
        if cell.cell_type == 'raw':
            md = _front_matter_to_markdown(cell.source)
            if md is None: continue
            cell = nbformat.v4.new_markdown_cell(md)
        elif cell.cell_type == 'markdown':   # Quarto maps links to notebooks onto their pages; do the same
            cell.source = NOTEBOOK_LINK.sub(r'](\1.html', ATTRIBUTES.sub(r'\1', cell.source))
        elif cell.cell_type == 'code':
            hidden = re.search(r'^\s*#\|\s*echo:\s*false', cell.source, re.M)
            cell.source = DIRECTIVE.sub('', cell.source).strip('\n')
            if hidden: cell.metadata.setdefault('tags', []).append('remove_input')  # nbconvert hides inputs by tag
            for output in cell.get('outputs', []):   # show_doc's markdown carries Quarto link attributes too
                markdown = output.get('data', {}).get('text/markdown')
                if markdown: output['data']['text/markdown'] = ATTRIBUTES.sub(r'\1', markdown)
            if (hidden or not cell.source) and not cell.get('outputs'): continue
        cells.append(cell)
    nb.cells = cells
    return nb


def _hide_tagged_inputs() -> Config:
    "nbconvert settings that drop the inputs tagged `remove_input` (the `echo: false` cells)."
    config = Config()
    config.TagRemovePreprocessor.enabled = True
    config.TagRemovePreprocessor.remove_input_tags = {'remove_input'}
    return config


def render_html(proc: Path, docs: Path) -> list:
    "One `_docs/<page>.html` per processed notebook, keeping sub-folders."
    exporter = HTMLExporter(config=_hide_tagged_inputs(), template_name='lab', exclude_input_prompt=True, exclude_output_prompt=True)
    pages = []
    for path in sorted(proc.rglob('*.ipynb')):
        rel = path.relative_to(proc)
        if any(part.startswith(('_', '.')) for part in rel.parts): continue
        body, _ = exporter.from_notebook_node(strip_quarto(nbformat.read(path, as_version=4)))
        out = docs / rel.with_suffix('.html')
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(body, encoding='utf-8')
        pages.append(out)
    return pages


def render_readme(proc: Path, readme_nb: str, readme: Path, site: str) -> None:
    "README.md from the processed home-page notebook, without its figures, its page links pointing at the `site`."
    nb = strip_quarto(nbformat.read(proc / readme_nb, as_version=4))
    for cell in nb.cells:
        if cell.cell_type == 'markdown':
            cell.source = re.sub(r'\]\((?!https?:|#)([^)]+\.html)', lambda m: f']({site}/{m.group(1)}', cell.source)
        if cell.cell_type == 'code':
            cell.outputs = [o for o in cell.get('outputs', [])
                            if not any(k.startswith('image/') for k in o.get('data', {}))]
    body, _ = MarkdownExporter(config=_hide_tagged_inputs()).from_notebook_node(nb)
    readme.write_text(re.sub(r'\n{3,}', '\n\n', body).strip() + '\n', encoding='utf-8')


def process_notebooks(cfg) -> tuple:
    """nbdev's `proc_nbs` into a fresh `_proc/`, one notebook at a time so that every failing notebook is reported,
    not just the first. No cache is reused: the doc links of an unchanged notebook change with the module index.
    Returns `(cache, [(notebook, error), ...])`."""
    cache, path = cfg.config_path / '_proc', cfg.nbs_path
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    sources = nbglob(path, func=Path, file_glob='', file_re='')
    sources += [path / '_quarto.yml'] if (path / '_quarto.yml').exists() else []
    jobs = [job for job in (_proc_file(s, cache=cache, path=path, mtime=0) for s in sources) if job]
    failures = []
    for job in jobs:
        try: nbdev.serve_drv.main(job)
        except Exception as e: failures.append((job[0].relative_to(path), e))
    return cache, failures


def main() -> int:
    t0 = time.time()
    cfg = get_config()
    with working_directory(cfg.config_path):
        refresh_quarto_yml()
        _build_modidx()
        nbdev_sidebar.__wrapped__(path=cfg.nbs_path)
        proc, failures = process_notebooks(cfg)
        docs = cfg.doc_path
        shutil.rmtree(docs, ignore_errors=True)
        pages = render_html(proc, docs)
        render_readme(proc, cfg.readme_nb, cfg.config_path / 'README.md', cfg.doc_host.rstrip('/') + cfg.doc_baseurl)
    print(f'docs_offline: {len(pages)} pages in {docs}, README.md from {cfg.readme_nb} ({time.time() - t0:.1f} s)')
    for notebook, error in failures:
        header, *cell = str(error).splitlines()
        cause = f'{type(error.__cause__).__name__}: {error.__cause__}' if error.__cause__ else ''
        print(f'docs_offline: FAIL {notebook}: {header} {cause}\n    ' + '\n    '.join(cell[:3]) +
              '\n  (nbdev runs the show_doc, export and import cells while building the docs: '
              'keep imports in cells of their own)', file=sys.stderr)
    return 1 if failures else 0


if __name__ == '__main__': sys.exit(main())
