"""Build the docs site without Quarto: a faithful, fully offline copy in `_docs/`, and README.md.

1. nbdev's own pre-render (what `nbdev_docs` does before `quarto render`): refresh nbdev.yml, rebuild the module
   index and process the notebooks into `_proc/` (show_doc rendered to markdown, `#| hide` cells dropped, the
   title cell turned into front matter). `tools/showdoc.py` makes the signatures read as in the code. Cells
   that mix imports with other code run their imports only, so no sampler or kernel compile runs here.
2. Every page gets the site's frame, generated from `nbs/_quarto.yml`: the navbar, the sidebar (its sections and
   globs, in order), the page's contents and an offline search (`_static/search.js`, a small JS index). Pages
   are named as on the Quarto site (nbdev strips `^\\d+[a-zA-Z0-9]*_` from notebook names); links to notebooks
   and to the online site become local links. Maths is rendered by MathJax from the npm `mathjax` package
   (`npm install mathjax@3` in the repository root; tools/test.sh does it), copied into `_static/`.
3. The API index, gallery and benchmarks pages are notebooks like the others (`nbs/api.ipynb`, `nbs/gallery.ipynb`,
   `nbs/benchmarks.ipynb`), written by `tools/docs_pages.py` and committed, so Quarto and this build show the same.
4. README.md from index.ipynb (figures left out: they are on the docs home page).

Usage: python tools/docs_offline.py   (run from anywhere inside the repository)
"""
import fnmatch, html, json, os, re, shutil, sys, time, warnings
from pathlib import Path

import mistune
import nbformat
import yaml
from nbconvert import MarkdownExporter
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer
from traitlets.config import Config
from fastcore.xtras import working_directory
from nbdev.config import get_config
from nbdev.doclinks import _build_modidx, nbglob
from nbdev.quarto import refresh_quarto_yml
import nbdev.processors
import nbdev.serve_drv
from nbdev.serve import _proc_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import showdoc  # noqa: E402  (tools/showdoc.py)

FRONT_MATTER = re.compile(r'^---\s*\n(.*?)\n---\s*$', re.S)
ATTRIBUTES = re.compile(r'(\]\([^)]*\))\{[^}]*\}')
DIRECTIVE = re.compile(r'^\s*#\|.*$\n?', re.M)
NUMBER_PREFIX = re.compile(r'^\d+[a-zA-Z0-9]*_')
MATH_OR_CODE = re.compile(r'(```.*?```|`[^`\n]*`|\$\$.+?\$\$|\\\[.+?\\\]|\\\(.+?\\\)|(?<![\\$\w])\$[^$\n]+?\$(?!\w))', re.S)
SHOWDOC_HEADING = re.compile(r'^#{2,4} (\S+)\s*$', re.M)
MATHJAX_FILE = 'node_modules/mathjax/es5/tex-svg-full.js'
HIDDEN_BUILD_KEYS = ('echo:', 'include:', 'output:')


def page_name(rel: Path) -> Path:
    "The site's page for a notebook path relative to nbs/ (as nbdev and Quarto name it)."
    return rel.with_name(NUMBER_PREFIX.sub('', rel.name.lower())).with_suffix('.html')


def slug(text: str) -> str:
    "Pandoc's heading identifier: lower case, punctuation other than `_-.` dropped, spaces to hyphens."
    text = re.sub(r'<[^>]+>', '', html.unescape(text)).strip().lower()
    text = re.sub(r'[^\w\s.\-]', '', text)
    text = re.sub(r'\s+', '-', text)
    return re.sub(r'^[^a-z]+', '', text) or 'section'


def is_private(name: str) -> bool:
    "A dotted name with a component that starts with `_` and is not a dunder (`_Loop.fit`, `Trainer._step`)."
    return any(p.startswith('_') and not (p.startswith('__') and p.endswith('__')) for p in name.split('.'))


# ---------------------------------------------------------------- nbdev pre-render

def _imports_only(source: str) -> str:
    "The import statements of a cell (nbdev executes cells with imports to resolve show_doc names)."
    import ast
    try: tree = ast.parse(source)
    except SyntaxError: return ''
    return '\n'.join(ast.get_source_segment(source, n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))


def _patch_exec_show_docs():
    "nbdev runs every cell that contains an import; for cells that also compute, run only their imports."
    original = nbdev.processors.exec_show_docs.__call__
    if getattr(original, '_imports_only', False): return

    def call(self, cell):
        if (cell.cell_type == 'code' and hasattr(self, 'k') and self.nb.has_docs_
                and not (cell.directives_.keys() & {'export', 'exports', 'exporti', 'exec_doc'})
                and not nbdev.processors._re_showdoc.search(cell.source)):
            imports = _imports_only(DIRECTIVE.sub('', cell.source))
            if imports.strip() != DIRECTIVE.sub('', cell.source).strip():
                if imports and cell.directives_.get('eval:', [''])[0].lower() != 'false':
                    self.k.run_cell(imports)
                    if self.k.exc: raise Exception(f'Error in cell {cell.idx_}:\n{imports}') from self.k.exc
                return
        return original(self, cell)
    call._imports_only = True
    nbdev.processors.exec_show_docs.__call__ = call


def process_notebooks(cfg) -> tuple:
    """nbdev's `proc_nbs` into a fresh `_proc/`, one notebook at a time so that every failing notebook is reported,
    not just the first. Returns `(cache, [(notebook, error), ...])`."""
    cache, path = cfg.config_path / '_proc', cfg.nbs_path
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    sources = nbglob(path, func=Path, file_glob='', file_re='')
    jobs = [job for job in (_proc_file(s, cache=cache, path=path, mtime=0) for s in sources) if job]
    failures, process_notebooks.seconds = [], {}
    for job in jobs:
        t0 = time.time()
        try: nbdev.serve_drv.main(job)
        except Exception as e: failures.append((job[0].relative_to(path), e))
        process_notebooks.seconds[job[0].relative_to(path).as_posix()] = time.time() - t0
    return cache, failures


def _front_matter_to_markdown(text: str):
    "A `---` YAML block as a `# title` / `> description` markdown source, or None."
    m = FRONT_MATTER.match(text.strip())
    if not m: return None
    fields = yaml.safe_load(m.group(1)) or {}
    lines = [f"# {fields['title']}"] if fields.get('title') else []
    if fields.get('description'): lines.append(f"> {' '.join(str(fields['description']).split())}")
    return '\n\n'.join(lines)


def _directives(source: str) -> dict:
    "Quarto cell options `#| key: value` of a cell."
    return {m.group(1).strip(): m.group(2).strip() for m in re.finditer(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*)$', source, re.M)}


def strip_quarto(nb):
    "Rewrite a processed notebook in place so that a plain renderer shows what Quarto would."
    cells = []
    for cell in nb.cells:
        if cell.cell_type == 'raw':
            md = _front_matter_to_markdown(cell.source)
            if md is None: continue
            cell = nbformat.v4.new_markdown_cell(md)
        elif cell.cell_type == 'markdown':
            cell.source = ATTRIBUTES.sub(r'\1', cell.source)
        elif cell.cell_type == 'code':
            opts = _directives(cell.source)
            cell.metadata['quarto'] = opts
            if opts.get('include') == 'false': continue
            hidden = opts.get('echo') == 'false'
            cell.source = DIRECTIVE.sub('', cell.source).strip('\n')
            if opts.get('output') == 'false': cell.outputs = []
            if hidden: cell.metadata.setdefault('tags', []).append('remove_input')
            for output in cell.get('outputs', []):   # show_doc's markdown carries Quarto link attributes too
                markdown = output.get('data', {}).get('text/markdown')
                if markdown: output['data']['text/markdown'] = ATTRIBUTES.sub(r'\1', markdown)
            if (hidden or not cell.source) and not cell.get('outputs'): continue
        cells.append(cell)
    nb.cells = cells
    return nb


# ---------------------------------------------------------------- markdown and cells to HTML

class _Renderer(mistune.HTMLRenderer):
    "mistune's HTML with code blocks highlighted like code cells."
    def block_code(self, code, info=None):
        lang = (info or '').split()[0] if info else ''
        if lang in ('python', 'py', ''):
            return code_html(code.strip('\n')) if lang else f'<pre><code>{html.escape(code.strip(chr(10)))}</code></pre>'
        return f'<pre><code class="language-{html.escape(lang)}">{html.escape(code.strip(chr(10)))}</code></pre>'


_markdown = mistune.create_markdown(escape=False, renderer=_Renderer(escape=False), plugins=['table', 'strikethrough', 'footnotes'])


def markdown_html(text: str) -> str:
    "Markdown to HTML with `$...$`, `$$...$$`, `\\(...\\)` and `\\[...\\]` kept verbatim for MathJax."
    maths = []
    def protect(m):
        token = m.group(0)
        if token.startswith('`'): return token
        maths.append(token)
        return f'\x02MATH{len(maths) - 1}\x03'
    out = _markdown(MATH_OR_CODE.sub(protect, text))
    return re.sub(r'\x02MATH(\d+)\x03', lambda m: html.escape(maths[int(m.group(1))], quote=False), out)


_lexer, _formatter = PythonLexer(), HtmlFormatter(nowrap=True)


def code_html(source: str) -> str:
    return f'<div class="highlight"><pre><code>{highlight(source, _lexer, _formatter)}</code></pre></div>'


def _text(value) -> str: return ''.join(value) if isinstance(value, list) else str(value)


_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')


class PageRenderer:
    "Renders one processed notebook's cells; remembers its headings and figures."
    def __init__(self, title: str):
        self.title, self.headings, self.figures, self.section = title, [], [], title

    def heading_ids(self, body: str) -> str:
        "Give every heading an id (pandoc's), record h2/h3 for the page's contents."
        def add(m):
            level, attrs, inner = m.group(1), m.group(2) or '', m.group(3)
            hid = re.search(r'id="([^"]+)"', attrs)
            hid = hid.group(1) if hid else slug(inner)
            base, n = hid, 1
            while hid in {h[1] for h in self.headings}: n += 1; hid = f'{base}-{n}'
            text = re.sub(r'<[^>]+>', '', inner).strip()
            self.headings.append((int(level), hid, html.unescape(text)))
            if level in '23': self.section = html.unescape(text)
            return f'<h{level} id="{hid}">{inner}<a class="anchor" href="#{hid}" aria-label="link to this section">#</a></h{level}>'
        return re.sub(r'<h([1-6])(\s[^>]*)?>(.*?)</h\1>', add, body, flags=re.S)

    def show_doc_html(self, markdown: str):
        "show_doc output, or '' for a private name (never a heading on the site)."
        m = SHOWDOC_HEADING.search(markdown)
        if m and is_private(m.group(1)): return ''
        body = markdown_html(re.sub(r'^---\s*\n', '', markdown))
        return f'<div class="showdoc">{self.heading_ids(body)}</div>'

    def figure(self, data: str, fmt: str, alt: str) -> str:
        fid = f'fig-{len(self.figures) + 1}'
        self.figures.append({'id': fid, 'alt': alt, 'data': data, 'fmt': fmt, 'section': self.section})
        src = f'data:image/{fmt};base64,{data.strip()}'
        return f'<figure id="{fid}"><img src="{src}" alt="{html.escape(alt)}" loading="lazy"></figure>'

    def alt_text(self, cell, output) -> str:
        "Quarto's `fig-alt`/`fig-cap`, else the plot's title from its text repr, else the section it illustrates."
        opts = cell.metadata.get('quarto', {})
        for key in ('fig-alt', 'fig-cap'):
            if opts.get(key): return opts[key].strip('"\'')
        plain = _text(output.get('data', {}).get('text/plain', ''))
        titles = re.findall(r"title=\{'center': '([^']+)'", plain)
        if titles: return f'Figure: {titles[0]}'
        return f'Figure: {self.section}'

    def output_html(self, cell, output) -> str:
        kind = output.get('output_type')
        if kind == 'stream':
            return f'<pre class="output">{html.escape(_ANSI.sub("", _text(output.get("text", ""))))}</pre>'
        if kind == 'error':
            return f'<pre class="output error">{html.escape(_ANSI.sub("", chr(10).join(output.get("traceback", []))))}</pre>'
        data = output.get('data', {})
        for fmt in ('png', 'jpeg', 'gif'):
            if f'image/{fmt}' in data: return self.figure(_text(data[f'image/{fmt}']), fmt, self.alt_text(cell, output))
        if 'image/svg+xml' in data: return f'<figure>{_text(data["image/svg+xml"])}</figure>'
        if 'text/markdown' in data:
            md = _text(data['text/markdown'])
            if md.lstrip().startswith('---') or SHOWDOC_HEADING.search(md): return self.show_doc_html(md)
            return f'<div class="output">{self.heading_ids(markdown_html(md))}</div>'
        if 'text/html' in data: return f'<div class="output">{_text(data["text/html"])}</div>'
        if 'text/latex' in data: return f'<div class="output">{html.escape(_text(data["text/latex"]))}</div>'
        if 'text/plain' in data: return f'<pre class="output">{html.escape(_ANSI.sub("", _text(data["text/plain"])))}</pre>'
        return ''

    def cell_html(self, cell) -> str:
        if cell.cell_type == 'markdown':
            return f'<div class="md">{self.heading_ids(markdown_html(cell.source))}</div>'
        if cell.cell_type != 'code': return ''
        parts = []
        if cell.source and 'remove_input' not in cell.metadata.get('tags', []): parts.append(code_html(cell.source))
        parts += [self.output_html(cell, o) for o in cell.get('outputs', [])]
        parts = [p for p in parts if p]
        return f'<div class="cell">{"".join(parts)}</div>' if parts else ''


def notebook_title(nb) -> tuple:
    "`(title, description)` from the first `# title` / `> description` markdown."
    for cell in nb.cells:
        if cell.cell_type == 'markdown':
            m = re.match(r'#\s+(.+)', cell.source.strip())
            if m:
                d = re.search(r'^>\s*(.+)$', cell.source, re.M)
                return m.group(1).strip(), (d.group(1).strip() if d else '')
    return None, ''


# ---------------------------------------------------------------- the site

class Page:
    def __init__(self, out: Path, title: str, description: str = '', body: str = '', src=None):
        self.out, self.title, self.description, self.body, self.src = out, title, description, body, src
        self.headings, self.figures = [], []


def _explicit(entries) -> set:
    "The pages a sidebar names without a glob."
    out = set()
    for entry in entries or []:
        if isinstance(entry, str) and not any(c in entry for c in '*?['): out.add(entry)
        elif isinstance(entry, dict) and 'href' in entry: out.add(entry['href'])
        elif isinstance(entry, dict) and 'section' in entry:
            contents = entry.get('contents', [])
            out |= _explicit([contents] if isinstance(contents, str) else contents)
    return out


def expand_sidebar(entries, known: dict, explicit=None) -> list:
    """`_quarto.yml`'s sidebar as `[('page', out) | ('section', title, [...])]`. A glob takes, in name order, the
    pages that no explicit entry names (so `tutorials/*.ipynb` collects new tutorials, not the guides)."""
    explicit = _explicit(entries) if explicit is None else explicit
    items = []
    for entry in entries or []:
        if isinstance(entry, dict) and 'href' in entry: entry = entry['href']
        if isinstance(entry, str):
            if any(c in entry for c in '*?['):
                matches = sorted(p for p in known if fnmatch.fnmatch(p, entry) and p not in explicit and p.count('/') == entry.count('/'))
            else: matches = [entry] if entry in known else []
            items += [('page', known[m]) for m in matches if ('page', known[m]) not in items]
        elif isinstance(entry, dict) and 'section' in entry:
            contents = entry.get('contents', [])
            items.append(('section', entry['section'], expand_sidebar([contents] if isinstance(contents, str) else contents, known, explicit)))
    return items


def sidebar_pages(items) -> list:
    out = []
    for item in items:
        out += [item[1]] if item[0] == 'page' else sidebar_pages(item[2])
    return out


class Site:
    def __init__(self, cfg, quarto: dict):
        self.cfg, self.quarto = cfg, quarto
        self.pages: dict = {}      # out path (relative to _docs) -> Page
        self.site_url = (cfg.doc_host.rstrip('/') + cfg.doc_baseurl.rstrip('/') + '/')
        self.title = get_config().title

    def rel(self, page: Path, target: Path) -> str:
        return os.path.relpath(target, page.parent if str(page.parent) != '.' else '.').replace(os.sep, '/')

    def local_links(self, page: Page, body: str) -> str:
        "Links to notebooks and to the online site become relative links between local pages."
        src_dir = page.src.parent if page.src else Path('.')

        def fix(m):
            attr, url = m.group(1), html.unescape(m.group(2))
            path, _, anchor = url.partition('#')
            if url.startswith(self.site_url): target = Path(path[len(self.site_url):] or 'index.html')
            elif re.match(r'^[a-z]+:|^#|^/', url) or not path: return m.group(0)
            elif path.endswith('.ipynb'): target = page_name(Path(os.path.normpath(src_dir / path)))
            elif path.endswith('.md') and not path.startswith('.'):
                repo = Path(os.path.normpath(Path('nbs') / src_dir / path))
                return f'{attr}="{self.cfg.git_url}/blob/{self.cfg.branch}/{repo.as_posix()}"'
            else: return m.group(0)
            if anchor and target in self.pages and anchor not in self.pages[target].ids: anchor = ''   # e.g. a method without show_doc
            return f'{attr}="{self.rel(page.out, target)}{"#" + anchor if anchor else ""}"'
        return re.sub(r'(href)="([^"]*)"', fix, body)

    def sidebar_html(self, page: Page, items) -> str:
        def walk(items):
            out = []
            for item in items:
                if item[0] == 'page':
                    p = self.pages[item[1]]
                    cls = ' class="active"' if p is page else ''
                    label = 'Home' if p.out == Path('index.html') else p.title
                    out.append(f'<li{cls}><a href="{self.rel(page.out, p.out)}">{html.escape(label)}</a></li>')
                else:
                    out.append(f'<li class="section"><span>{html.escape(item[1])}</span><ul>{walk(item[2])}</ul></li>')
            return ''.join(out)
        return f'<nav class="sidebar" aria-label="site"><ul>{walk(items)}</ul></nav>'

    def navbar_html(self, page: Page) -> str:
        links = []
        for entry in self.quarto.get('website', {}).get('navbar', {}).get('left', []):
            href = entry.get('href', '')
            target = page_name(Path(href)) if href.endswith('.ipynb') else Path(href)
            links.append(f'<a href="{self.rel(page.out, target)}">{html.escape(entry.get("text", href))}</a>')
        root = self.rel(page.out, Path('index.html'))
        return (f'<header class="navbar"><a class="brand" href="{root}">{html.escape(self.title)}</a>{"".join(links)}'
                f'<div class="search"><input id="search" type="search" placeholder="Search" aria-label="Search" '
                f'autocomplete="off"><div id="search-results"></div></div></header>')

    def toc_html(self, page: Page) -> str:
        rows = [(l, i, t) for l, i, t in page.headings if l in (2, 3)]
        if len(rows) < 2: return '<nav class="toc"></nav>'
        items = ''.join(f'<li class="l{l}"><a href="#{i}">{html.escape(t)}</a></li>' for l, i, t in rows)
        return f'<nav class="toc" aria-label="On this page"><h2>On this page</h2><ul>{items}</ul></nav>'

    def write(self, page: Page, items, docs: Path) -> None:
        static = self.rel(page.out, Path('_static'))
        body = self.local_links(page, page.body)
        doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(page.title)} – {html.escape(self.title)}</title>
<meta name="description" content="{html.escape(page.description)}">
<link rel="stylesheet" href="{static}/site.css">
<script>window.MathJax = {{tex: {{inlineMath: [['$', '$'], ['\\\\(', '\\\\)']], displayMath: [['$$', '$$'], ['\\\\[', '\\\\]']]}},
  options: {{skipHtmlTags: ['script', 'noscript', 'style', 'textarea', 'pre', 'code']}}, svg: {{fontCache: 'global'}}}};</script>
<script defer src="{static}/mathjax/tex-svg-full.js"></script>
<script defer src="{static}/search.js" data-root="{static}/.."></script>
</head><body>
{self.navbar_html(page)}
<div class="layout">{self.sidebar_html(page, items)}<main class="content">{body}</main>{self.toc_html(page)}</div>
</body></html>"""
        out = docs / page.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(doc, encoding='utf-8')

    def search_index(self) -> list:
        entries = []
        for page in self.pages.values():
            entries.append({'t': page.title, 'u': page.out.as_posix(), 'd': page.description[:160]})
            seen = set()   # a section and the show_doc under it often share a name: list the first
            for level, hid, text in page.headings:
                if level in (2, 3, 4) and text not in seen:
                    seen.add(text)
                    entries.append({'t': text, 'u': f'{page.out.as_posix()}#{hid}', 'd': page.title})
        return entries


# ---------------------------------------------------------------- static files

CSS = """
:root { --nav: 3.2rem; --side: 15.5rem; --toc: 14rem; --accent: #2c5d9f; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #212529; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
.navbar { position: fixed; top: 0; left: 0; right: 0; height: var(--nav); display: flex; align-items: center; gap: 1.2rem;
  padding: 0 1.2rem; background: var(--accent); z-index: 10; }
.navbar a { color: #fff; } .navbar .brand { font-weight: 700; font-size: 1.15rem; margin-right: .8rem; }
.search { margin-left: auto; position: relative; }
#search { width: 16rem; padding: .3rem .6rem; border-radius: 4px; border: 0; }
#search-results { position: absolute; right: 0; top: 2.1rem; width: 28rem; max-height: 70vh; overflow: auto; background: #fff;
  box-shadow: 0 4px 16px rgba(0,0,0,.2); border-radius: 4px; display: none; }
#search-results a { display: block; padding: .4rem .7rem; color: #212529; border-bottom: 1px solid #eee; }
#search-results a small { color: #6c757d; display: block; } #search-results a:hover { background: #eef3fa; text-decoration: none; }
.layout { display: grid; grid-template-columns: var(--side) minmax(0, 1fr) var(--toc); gap: 1.5rem; padding-top: var(--nav); }
.sidebar, .toc { position: sticky; top: var(--nav); height: calc(100vh - var(--nav)); overflow-y: auto; padding: 1rem 0 2rem; font-size: .88rem; }
.sidebar { padding-left: 1rem; border-right: 1px solid #e9ecef; }
.sidebar ul, .toc ul { list-style: none; margin: 0; padding: 0; }
.sidebar li { margin: .12rem 0; } .sidebar li a { color: #343a40; display: block; padding: .08rem .4rem; border-radius: 3px; }
.sidebar li.active > a { background: #e3ecf8; color: var(--accent); font-weight: 600; }
.sidebar li.section > span { display: block; margin-top: .8rem; font-weight: 700; color: #212529; }
.sidebar li.section ul { padding-left: .5rem; }
.toc h2 { font-size: .85rem; margin: 0 0 .4rem; } .toc li.l3 { padding-left: .8rem; } .toc a { color: #495057; }
.content { min-width: 0; padding: 1rem 0 4rem; max-width: 60rem; }
h1 { font-size: 2rem; margin-top: .5rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #e9ecef; padding-bottom: .2rem; }
h1, h2, h3, h4 { scroll-margin-top: calc(var(--nav) + .5rem); }
.anchor { visibility: hidden; margin-left: .3rem; color: #adb5bd; font-size: .8em; }
h1:hover .anchor, h2:hover .anchor, h3:hover .anchor, h4:hover .anchor { visibility: visible; }
blockquote { margin: 0 0 1rem; padding: 0 1rem; color: #495057; border-left: 4px solid #dee2e6; font-size: 1.1rem; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .9rem; }
th, td { border: 1px solid #dee2e6; padding: .3rem .6rem; text-align: left; vertical-align: top; } th { background: #f1f3f5; }
pre { background: #f8f9fa; padding: .7rem .9rem; overflow-x: auto; border-radius: 4px; font-size: .85rem; line-height: 1.4; }
pre code.language-sh, pre code.language-bash, pre code.language-shell { white-space: pre-wrap; }
code { font-family: SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; font-size: .88em; }
p code, li code, td code { background: #f1f3f5; padding: .05rem .25rem; border-radius: 3px; }
.cell { margin: 1rem 0; } .cell .highlight pre { border-left: 3px solid #a3bde0; margin-bottom: .3rem; }
pre.output { background: #fff; border: 1px solid #e9ecef; } pre.output.error { color: #a4161a; }
.showdoc { margin: 1.5rem 0; padding: .2rem 1rem; border: 1px solid #dee2e6; border-radius: 6px; background: #fcfcfd; }
.showdoc h2, .showdoc h3, .showdoc h4 { border: 0; margin-top: .6rem; font-family: SFMono-Regular, Menlo, Consolas, monospace; }
.showdoc a[href*="github.com"] { float: right; font-size: .8rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(16rem, 1fr)); gap: 1rem; }
.gallery .card { border: 1px solid #dee2e6; border-radius: 6px; padding: .5rem; color: #343a40; font-size: .85rem; }
.gallery .card img { width: 100%; height: 12rem; object-fit: contain; display: block; margin-bottom: .3rem; }
.description { font-size: 1.1rem; color: #495057; }
@media (max-width: 1100px) { .layout { grid-template-columns: var(--side) minmax(0, 1fr); } .toc { display: none; } }
@media (max-width: 700px) { .layout { display: block; padding: var(--nav) 1rem 0; } .sidebar { display: none; } }
"""

SEARCH_JS = """(function () {
  var INDEX = %s;
  var me = document.currentScript, root = me.getAttribute('data-root') + '/';
  function ready() {
    var box = document.getElementById('search'), out = document.getElementById('search-results');
    if (!box) return;
    box.addEventListener('input', function () {
      var words = box.value.toLowerCase().split(/\\s+/).filter(Boolean);
      if (!words.length) { out.style.display = 'none'; return; }
      var hits = [];
      INDEX.forEach(function (e) {
        var hay = (e.t + ' ' + e.d).toLowerCase(), score = 0;
        for (var i = 0; i < words.length; i++) { if (hay.indexOf(words[i]) < 0) return; score += e.t.toLowerCase().indexOf(words[i]) >= 0 ? 2 : 1; }
        if (e.u.indexOf('#') < 0) score += 1;
        hits.push([score, e]);
      });
      hits.sort(function (a, b) { return b[0] - a[0]; });
      out.innerHTML = hits.slice(0, 25).map(function (h) {
        var e = h[1], a = document.createElement('a');
        a.href = root + e.u; a.textContent = e.t;
        var s = document.createElement('small'); s.textContent = e.d; a.appendChild(s);
        return a.outerHTML;
      }).join('') || '<a>No match</a>';
      out.style.display = 'block';
    });
    document.addEventListener('click', function (ev) { if (!out.contains(ev.target) && ev.target !== box) out.style.display = 'none'; });
    var q = new URLSearchParams(location.search).get('q');   // index.html?q=... opens with that search
    if (q) { box.value = q; box.dispatchEvent(new Event('input')); }
  }
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', ready); else ready();
})();
"""


def write_static(docs: Path, root: Path, index: list) -> bool:
    "CSS, the search script with its index, and MathJax; False when MathJax is not installed."
    static = docs / '_static'
    (static / 'mathjax').mkdir(parents=True, exist_ok=True)
    (static / 'site.css').write_text(CSS + HtmlFormatter().get_style_defs('.highlight'), encoding='utf-8')
    (static / 'search.js').write_text(SEARCH_JS % json.dumps(index, separators=(',', ':')), encoding='utf-8')
    mathjax = root / MATHJAX_FILE
    if mathjax.exists(): shutil.copy(mathjax, static / 'mathjax' / mathjax.name)
    return mathjax.exists()


# ---------------------------------------------------------------- README

def _hide_tagged_inputs() -> Config:
    config = Config()
    config.TagRemovePreprocessor.enabled = True
    config.TagRemovePreprocessor.remove_input_tags = {'remove_input'}
    return config


def render_readme(proc: Path, readme_nb: str, readme: Path, site: str) -> None:
    "README.md from the processed home-page notebook, without its figures, its page links pointing at the `site`."
    nb = strip_quarto(nbformat.read(proc / readme_nb, as_version=4))
    for cell in nb.cells:
        if cell.cell_type == 'markdown':
            cell.source = re.sub(r'\]\((?!https?:|#)([^)]+?)\.ipynb',
                                 lambda m: f']({site}/{page_name(Path(m.group(1) + ".ipynb")).as_posix()}', cell.source)
            cell.source = re.sub(r'\]\((?!https?:|#)([^)]+\.html)', lambda m: f']({site}/{m.group(1)}', cell.source)
        if cell.cell_type == 'code':
            cell.outputs = [o for o in cell.get('outputs', []) if not any(k.startswith('image/') for k in o.get('data', {}))]
    body, _ = MarkdownExporter(config=_hide_tagged_inputs()).from_notebook_node(nb)
    readme.write_text(re.sub(r'\n{3,}', '\n\n', body).strip() + '\n', encoding='utf-8')


# ---------------------------------------------------------------- main

def build(cfg) -> tuple:
    root, nbs, docs = cfg.config_path, cfg.nbs_path, cfg.doc_path
    refresh_quarto_yml()
    _build_modidx()
    showdoc.patch()
    _patch_exec_show_docs()
    os.environ['TORCHEBM_DISABLE_KERNELS'] = '1'   # nothing in the docs build needs a compiled kernel
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Found cells containing imports')
        proc, failures = process_notebooks(cfg)
    quarto = yaml.safe_load((nbs / '_quarto.yml').read_text())
    site = Site(cfg, quarto)
    shutil.rmtree(docs, ignore_errors=True)
    docs.mkdir(parents=True)

    known = {}
    for path in sorted(proc.rglob('*.ipynb')):
        rel = path.relative_to(proc)
        if any(part.startswith(('_', '.')) for part in rel.parts): continue
        nb = strip_quarto(nbformat.read(path, as_version=4))
        title, description = notebook_title(nb)
        renderer = PageRenderer(title or rel.stem)
        body = ''.join(renderer.cell_html(c) for c in nb.cells)
        out = page_name(rel)
        if out in site.pages:
            failures.append((rel, Exception(f'page name collision: {rel} and {site.pages[out].src} both become {out}')))
        page = Page(out, title or rel.stem, description, body, src=rel)
        page.headings, page.figures = renderer.headings, renderer.figures
        site.pages[out] = page
        known[rel.as_posix()] = out

    items = expand_sidebar(quarto.get('website', {}).get('sidebar', {}).get('contents', []), known)
    listed = sidebar_pages(items)
    unlisted = [p for p in site.pages if p not in listed]
    if unlisted: items.append(('section', 'More', [('page', p) for p in unlisted]))

    for page in site.pages.values(): page.ids = set(re.findall(r'\sid="([^"]+)"', page.body))
    for page in site.pages.values(): site.write(page, items, docs)
    mathjax = write_static(docs, root, site.search_index())
    render_readme(proc, cfg.readme_nb, root / 'README.md', cfg.doc_host.rstrip('/') + cfg.doc_baseurl)
    return site, failures, mathjax


def main() -> int:
    t0 = time.time()
    cfg = get_config()
    with working_directory(cfg.config_path):
        site, failures, mathjax = build(cfg)
    slowest = sorted(process_notebooks.seconds.items(), key=lambda kv: -kv[1])[:3]
    print(f'docs_offline: {len(site.pages)} pages in {cfg.doc_path}, README.md from {cfg.readme_nb} ({time.time() - t0:.1f} s; '
          f'nbdev processing {sum(process_notebooks.seconds.values()):.1f} s, slowest: '
          + ', '.join(f'{k} {v:.1f} s' for k, v in slowest) + ')')
    if not mathjax:
        print(f'docs_offline: FAIL no MathJax at {MATHJAX_FILE}: run `npm install --no-save mathjax@3` in the repository root',
              file=sys.stderr)
    for notebook, error in failures:
        header, *cell = str(error).splitlines() or ['']
        cause = f'{type(error.__cause__).__name__}: {error.__cause__}' if error.__cause__ else ''
        print(f'docs_offline: FAIL {notebook}: {header} {cause}\n    ' + '\n    '.join(cell[:3]) +
              '\n  (nbdev runs the show_doc, export and import cells while building the docs: '
              'keep imports in cells of their own)', file=sys.stderr)
    return 1 if failures or not mathjax else 0


if __name__ == '__main__': sys.exit(main())
