"""The docs site: its offline copy (`tools/docs_offline.py` -> `_docs/`) opened in headless Chromium, and the rules
every page keeps (unique names, working local links, signatures as in the code, no private headings, no machine
paths in stored outputs, alt text on figures, an API index that lists every public name).

tools/test.sh builds the pages and installs Debian's `chromium` and the npm `mathjax` package first; run alone,
this file builds the pages when they are missing. The screenshots land in `_docs/_screenshots/`.
"""
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
DOCS = ROOT / '_docs'
sys.path.insert(0, str(ROOT / 'tools'))
from docs_offline import is_private, page_name  # noqa: E402
import docs_pages  # noqa: E402
from docs_pages import API_PACKAGES  # noqa: E402
import showdoc  # noqa: E402

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--virtual-time-budget=15000']
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (tools/test.sh installs it)")
MACHINE_PATH = re.compile(r'(?<![\w.])(/work/|/root/|/home/[\w.-]+/|/tmp/|/Users/|/private/var/|[A-Z]:\\\\Users)')


def notebooks():
    return sorted(p.relative_to(NBS) for p in NBS.rglob('*.ipynb')
                  if not any(part.startswith(('_', '.')) for part in p.relative_to(NBS).parts))


@pytest.fixture(scope='module')
def docs():
    if not (DOCS / 'index.html').exists():
        subprocess.run([sys.executable, str(ROOT / 'tools' / 'docs_offline.py')], cwd=ROOT, timeout=600)
    assert (DOCS / 'index.html').exists(), 'tools/docs_offline.py did not write _docs/index.html'
    return DOCS


def pages(docs):
    return sorted(p for p in docs.rglob('*.html') if not p.relative_to(docs).parts[0].startswith('_'))


def text_of(dom: str) -> str:
    return html.unescape(re.sub(r'<[^>]+>', '', dom))


# ---------------------------------------------------------------- names, links, contents (no browser)

def test_no_two_notebooks_share_a_page_name():
    "nbdev strips `^\\d+[a-zA-Z0-9]*_`: `31_models` and `39_models` would both be models.html on the site."
    names = {}
    for nb in notebooks(): names.setdefault(page_name(nb), []).append(str(nb))
    collisions = {str(k): v for k, v in names.items() if len(v) > 1}
    assert not collisions, f'notebooks that become the same page: {collisions}; rename one (and fix its links)'
    assert page_name(Path('31_models.ipynb')) == page_name(Path('39_models.ipynb'))   # the rule the check relies on


def test_every_notebook_has_its_page_in_the_sidebar(docs):
    index = (docs / 'index.html').read_text()
    sidebar = re.search(r'<nav class="sidebar".*?</nav>', index, re.S).group(0)
    assert '<span>More</span>' not in sidebar, 'notebooks missing from nbs/_quarto.yml land in a "More" section: list them'
    for nb in notebooks():
        page = docs / page_name(nb)
        assert page.exists(), f'no page for {nb}: run tools/docs_offline.py and read its FAIL lines'
        assert f'href="{page_name(nb).as_posix()}"' in sidebar, f'{nb} is not in the sidebar'


def test_every_local_link_and_anchor_resolves(docs):
    ids = {}
    def anchors(page):
        if page not in ids: ids[page] = set(re.findall(r'\sid="([^"]+)"', page.read_text(encoding='utf-8')))
        return ids[page]
    broken = []
    for page in pages(docs):
        dom = page.read_text(encoding='utf-8')
        for url in re.findall(r'(?:href|src)="([^"]+)"', dom):
            url = html.unescape(url)
            if re.match(r'^(https?:|data:|mailto:|javascript:)', url): continue
            path, _, anchor = url.partition('#')
            target = (page.parent / unquote(path)).resolve() if path else page
            if not target.exists(): broken.append(f'{page.relative_to(docs)} -> {url}')
            elif anchor and target.suffix == '.html' and unquote(anchor) not in anchors(target):
                broken.append(f'{page.relative_to(docs)} -> {url} (no such anchor)')
    assert not broken, f'{len(broken)} broken local links:\n' + '\n'.join(broken[:40])


def test_pages_load_nothing_from_the_network(docs):
    for page in pages(docs):
        dom = page.read_text(encoding='utf-8')
        remote = re.findall(r'<(?:script|link|img|iframe)[^>]+(?:src|href)="(https?:[^"]+)"', dom)
        assert not remote, f'{page.name} loads {remote[:3]}'
        assert not re.search(r'href="https?://torchebm\.github\.io', dom), f'{page.name} links the online site'
    assert (docs / '_static' / 'mathjax' / 'tex-svg-full.js').exists(), 'MathJax not copied: npm install mathjax@3'


def test_no_private_name_is_a_heading(docs):
    private = []
    for page in pages(docs):
        for hid, inner in re.findall(r'<h[1-4] id="([^"]+)">(.*?)</h[1-4]>', page.read_text(encoding='utf-8'), re.S):
            name = text_of(inner).rstrip('#').strip()
            if re.fullmatch(r'[\w.]+', name) and is_private(name): private.append(f'{page.name}: {name}')
    assert not private, private
    assert is_private('_TrainingLoop.fit') and is_private('Trainer._step') and not is_private('Model.__call__')


def test_figures_have_alt_text_and_a_readable_size(docs):
    import base64, io
    from PIL import Image
    for page in pages(docs):
        for tag in re.findall(r'<img[^>]*>', page.read_text(encoding='utf-8')):
            alt = re.search(r'alt="([^"]*)"', tag)
            assert alt and len(alt.group(1).strip()) > 8, f'{page.name}: figure without alt text'
            png = re.search(r'src="data:image/png;base64,([^"]+)"', tag)
            if png and page.name != 'gallery.html':
                size = Image.open(io.BytesIO(base64.b64decode(png.group(1)))).size
                assert size[0] >= 250 and size[1] >= 120, f'{page.name}: a {size} figure is too small to read'


def test_api_index_lists_every_public_name_with_a_summary(docs):
    import importlib
    dom = (docs / 'api.html').read_text(encoding='utf-8')
    rows = {text_of(name).strip(): text_of(summary).strip()
            for name, summary in re.findall(r'<tr>\s*<td>(.*?)</td>\s*<td>(.*?)</td>\s*</tr>', dom, re.S)}
    for package in API_PACKAGES:
        module = importlib.import_module(f'torchebm.{package}')
        assert module.__all__, package
        for name in module.__all__:
            assert name in rows, f'torchebm.{package}.{name} missing from the API index'
            assert rows[name], f'torchebm.{package}.{name} has no one-line summary (give it a docstring)'


def test_benchmarks_and_gallery_pages(docs):
    bench = (docs / 'benchmarks.html').read_text(encoding='utf-8')
    assert bench.count('<img') >= 2 and 'log scale' in bench and 'W1' in bench
    gallery = (docs / 'gallery.html').read_text(encoding='utf-8')
    assert gallery.count('class="card"') >= 5, 'the gallery collects the figures of the tutorials'
    assert re.search(r'href="tutorials/getting_started.html#[\w.-]+"', gallery), 'a card links the section that draws it'


def test_generated_pages_are_up_to_date():
    "api, gallery and benchmarks are notebooks written by tools/docs_pages.py: the committed ones match what it writes."
    stale = docs_pages.stale(docs_pages.build())
    assert not stale, f'out of date: {stale}; run `python tools/docs_pages.py` and commit nbs/' + ', nbs/'.join(stale)


def test_stale_check_fails_on_an_edited_page():
    pages = {'api.ipynb': docs_pages.api_cells()}
    assert not docs_pages.stale(pages)
    pages['api.ipynb'][1] += '\n| `Extra` | a name that is not there |'
    assert docs_pages.stale(pages) == ['api.ipynb']


def _listed(entries):
    for entry in entries or []:
        if isinstance(entry, dict) and 'section' in entry:
            contents = entry.get('contents', [])
            yield from _listed([contents] if isinstance(contents, str) else contents)
        elif isinstance(entry, (str, dict)):
            yield entry['href'] if isinstance(entry, dict) else entry


def test_every_page_the_sidebar_and_navbar_name_exists():
    import yaml
    site = yaml.safe_load((NBS / '_quarto.yml').read_text())['website']
    names = list(_listed(site['sidebar']['contents'])) + [e['href'] for e in site['navbar']['left']]
    missing = [n for n in names if not any(c in n for c in '*?[') and not (NBS / n).exists()]
    assert not missing, f'nbs/_quarto.yml names notebooks that do not exist: {missing}'
    pages = [page_name(Path(n)) for n in dict.fromkeys(names) if not any(c in n for c in '*?[')]
    assert len(pages) == len(set(pages)), 'two listed notebooks become the same page'


def test_readme_says_how_to_install_this_library():
    readme = (ROOT / 'README.md').read_text()
    assert 'git clone' in readme and 'pip install git+' in readme
    assert 'pip install -e ".[dev]" && python -m torchebm.demo' in readme and 'bash tools/test.sh' in readme
    assert 'TorchEBM 0.8' in readme, 'say that `pip install torchebm` is another library'


# ---------------------------------------------------------------- show_doc signatures

def test_signatures_read_as_in_the_code():
    from fastcore.docments import DocmentText
    from torchebm.samplers import LangevinDynamics
    from torchebm.samplers.mcmc import MCMCSampler
    showdoc.patch()
    text = str(DocmentText(LangevinDynamics))
    assert text.startswith('LangevinDynamics(\n') and 'def LangevinDynamics' not in text
    assert 'step_size: Union[float, BaseScheduler] = 1e-3, # step size' in text
    assert 'model=None, # energy model' in text and 'NoneType' not in text
    assert 'dtype: Optional[torch.dtype] = None' in text and '*, energy_function=None' in text
    method = str(DocmentText(MCMCSampler.sample))
    assert method.startswith('def sample(') and 'self' not in method and 'generator: Optional[torch.Generator] = None' in method

    def varargs(x: int, *tensors, scale: float = 1.0, **kwargs) -> int:
        "Example."
        return x
    assert showdoc.signature_text(varargs) == 'def varargs(x: int, *tensors, scale: float = 1.0, **kwargs) -> int:'


LOSSY = re.compile(r'\w:(NoneType|Union|Optional|VAR_POSITIONAL|VAR_KEYWORD)\b')


def test_lossy_signature_check_fails_on_fastcores_own_text():
    "The broken variant: unpatched fastcore writes `def LangevinDynamics(`, `model:NoneType=None`, `step_size:Union=`."
    from fastcore.docments import DocmentText
    from torchebm.samplers import LangevinDynamics
    text = showdoc.fastcore_text(DocmentText(LangevinDynamics))
    assert 'def LangevinDynamics(' in text and LOSSY.search(text)


def test_no_page_shows_a_lossy_signature(docs):
    "fastcore's own text (`step_size:Union=0.001`, `model:NoneType=None`, `args:VAR_POSITIONAL`) appears nowhere."
    lossy = LOSSY
    for page in pages(docs):
        found = lossy.findall(text_of(page.read_text(encoding='utf-8')))
        assert not found, f'{page.name}: {found[:5]}'


# ---------------------------------------------------------------- stored outputs

@pytest.mark.parametrize('nb', notebooks(), ids=str)
def test_outputs_have_no_machine_paths(nb):
    "Stored outputs must not show where they were run (`/work/...`, `/root/...`, a temporary directory)."
    cells = json.loads((NBS / nb).read_text())['cells']
    found = []
    for i, cell in enumerate(cells):
        for output in cell.get('outputs', []):
            parts = [output.get('text', ''), output.get('traceback', '')]
            parts += [v for k, v in output.get('data', {}).items() if not k.startswith('image/')]
            text = '\n'.join(''.join(p) if isinstance(p, list) else str(p) for p in parts)
            found += [f'cell {i}: ...{text[max(0, m.start() - 40):m.end() + 40]}...' for m in MACHINE_PATH.finditer(text)]
    assert not found, f'{nb}: ' + '\n'.join(found[:5])


def test_machine_path_pattern():
    assert MACHINE_PATH.search('loaded from /work/main/.torch_extensions/x') and MACHINE_PATH.search('/tmp/tmpab/x.pt')
    assert not MACHINE_PATH.search('see torchebm/cuda/loader.py and ./torchebm_demo/')


# ---------------------------------------------------------------- in the browser

def _chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([CHROMIUM, *FLAGS, f'--user-data-dir={profile}', *args, page.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@needs_chromium
@pytest.mark.parametrize('page,maths', [('index.html', 2), ('tutorials/getting_started.html', 3), ('langevin.html', 5)])
def test_page_in_the_browser_has_sidebar_maths_and_pictures(docs, tmp_path, page, maths):
    from PIL import Image
    dom = _chromium(docs / page, tmp_path / 'profile', '--dump-dom').stdout
    sidebar = re.search(r'<nav class="sidebar".*?</nav>', dom, re.S)
    assert sidebar and sidebar.group(0).count('<a ') > 30, 'the sidebar lists the site'
    assert 'class="active"' in sidebar.group(0)
    assert '<header class="navbar">' in dom and 'id="search"' in dom
    assert dom.count('<mjx-container') >= maths, 'MathJax did not typeset the maths (offline)'
    errors = re.findall(r'data-mjx-error="([^"]*)"', dom)
    assert not errors, f'formulas that failed to render: {errors[:5]}'
    assert dom.count('<img') >= 1 and '{target=' not in dom and '#| ' not in dom
    shots = docs / '_screenshots'
    shots.mkdir(exist_ok=True)
    shot = shots / (page.replace('/', '_').replace('.html', '.png'))
    _chromium(docs / page, tmp_path / 'profile', '--window-size=1400,1000', '--hide-scrollbars', f'--screenshot={shot}')
    image = Image.open(shot).convert('RGB')
    assert image.size == (1400, 1000)
    assert image.getpixel((700, 20))[2] > image.getpixel((700, 20))[0] + 40, 'the navbar (blue) is on top'
    grey = image.convert('L')
    assert len(grey.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50, 'a blank page'


@needs_chromium
def test_search_finds_a_class(docs, tmp_path):
    "The offline search (a JS index, works from file://) lists the class's section first; `?q=` fills the box."
    index = (docs / '_static' / 'search.js').read_text()
    assert '"LangevinDynamics"' in index and '"u":"langevin.html#langevindynamics"' in index
    page = docs / 'tutorials' / 'getting_started.html'
    result = subprocess.run([CHROMIUM, *FLAGS, f'--user-data-dir={tmp_path / "profile"}', '--dump-dom',
                             page.as_uri() + '?q=LangevinDynamics'], capture_output=True, text=True, timeout=120)
    results = re.search(r'<div id="search-results"[^>]*>(.*?)</div>', result.stdout, re.S)
    assert results, result.stderr[-1000:]
    hrefs = re.findall(r'href="([^"]+)"', results.group(1))
    assert hrefs and any(h.endswith('langevin.html#langevindynamics') for h in hrefs[:3]), hrefs[:5]
    assert (page.parent / hrefs[0].split('#')[0]).resolve().exists()


def test_home_page_has_the_commands_and_the_tour(docs):
    text = text_of((docs / 'index.html').read_text(encoding='utf-8'))
    assert 'pip install -e ".[dev]" && python -m torchebm.demo' in text and 'bash tools/test.sh' in text
    assert 'LangevinDynamics' in text and 'ContrastiveDivergence' in text
    assert text.index('python -m torchebm.demo') < text.index('What is in the box'), 'the two commands come first'
