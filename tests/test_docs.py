"""The offline docs preview (`tools/docs_offline.py` -> `_docs/`) opened in headless Chromium.

Checks what a reader sees: the home page (title, the README's two commands, the tour's figures) and one API
page (show_doc signature blocks for the samplers, figures, no leftover Quarto syntax). tools/test.sh builds the
pages and installs Debian's `chromium` first; run alone, this file builds the pages when they are missing.
"""
import base64
import html
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / '_docs'
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync']
PNG_SRC = re.compile(r'<img[^>]*src="data:image/png;base64,([A-Za-z0-9+/=\s]+)"')

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (tools/test.sh installs it)")


@pytest.fixture(scope='module')
def docs():
    if not (DOCS / 'index.html').exists():
        subprocess.run([sys.executable, str(ROOT / 'tools' / 'docs_offline.py')], cwd=ROOT, timeout=600)
    assert (DOCS / 'index.html').exists(), 'tools/docs_offline.py did not write _docs/index.html'
    return DOCS


def _chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([CHROMIUM, *FLAGS, f'--user-data-dir={profile}', *args, page.as_uri()],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _dom(page: Path, tmp_path: Path) -> str:
    "The page's DOM after Chromium has loaded it."
    return _chromium(page, tmp_path / 'profile', '--dump-dom').stdout


def _pictures(dom: str):
    "The PNG figures embedded in a page, opened with Pillow."
    from PIL import Image
    return [Image.open(io.BytesIO(base64.b64decode(re.sub(r'\s', '', m)))) for m in PNG_SRC.findall(dom)]


def test_home_page_has_the_commands_the_tour_and_its_figures(docs, tmp_path):
    dom = _dom(docs / 'index.html', tmp_path)
    assert re.search(r'<h1[^>]*>\s*torchebm', dom)
    text = html.unescape(re.sub(r'<[^>]+>', '', dom))   # highlighted code is split into spans
    assert 'pip install -e ".[dev]" && python -m torchebm.demo' in text and 'bash tools/test.sh' in text
    assert 'LangevinDynamics' in text and 'ContrastiveDivergence' in text
    pictures = _pictures(dom)
    assert len(pictures) >= 2
    assert all(p.format == 'PNG' and p.width > 200 and p.height > 150 for p in pictures)


def test_api_page_has_show_doc_blocks_and_figures(docs, tmp_path):
    page = docs / '13_langevin.html'
    assert page.exists(), sorted(p.name for p in docs.glob('*.html'))
    dom = _dom(page, tmp_path)
    assert re.search(r'<h3 id="LangevinDynamics">LangevinDynamics', dom)
    signatures = re.findall(r'<h[234] id="[\w.]+">[\w.]+<a class="anchor-link"[^>]*>¶</a></h[234]>\s*<div class="highlight">', dom)
    assert len(signatures) >= 2, 'expected show_doc signature blocks'
    # nbdev 2 renders the argument table as one documented line per parameter inside the signature block
    for argument_doc in ('step size eta &gt; 0, or a scheduler', 'add a Metropolis-Hastings test (MALA)'):
        assert argument_doc in dom, f'argument documentation {argument_doc!r} missing from the API page'
    assert '>source</a>' in dom and '{target=' not in dom and '#| ' not in dom
    assert len(_pictures(dom)) >= 1


def test_screenshot_of_the_home_page_is_not_blank(docs, tmp_path):
    from PIL import Image
    shot = tmp_path / 'home.png'
    _chromium(docs / 'index.html', tmp_path / 'profile', '--window-size=1000,1400', f'--screenshot={shot}')
    image = Image.open(shot).convert('L')
    assert image.size == (1000, 1400)
    low, high = image.getextrema()
    assert high - low > 100
    assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50   # text and figures, not a blank page


def test_every_notebook_has_its_page(docs):
    notebooks = [p.relative_to(ROOT / 'nbs') for p in (ROOT / 'nbs').rglob('*.ipynb')
                 if not any(part.startswith(('_', '.')) for part in p.relative_to(ROOT / 'nbs').parts)]
    missing = [str(nb) for nb in notebooks if not (docs / nb.with_suffix('.html')).exists()]
    assert not missing, f'no page for {missing}: run tools/docs_offline.py and read its FAIL lines'
