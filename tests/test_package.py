"Package-level checks: the installed package, its version, and the notebook -> module map."
import configparser, importlib, json, re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _settings():
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(ROOT / 'settings.ini')
    return cfg['DEFAULT']


def _default_exps():
    found = {}
    for nb in sorted((ROOT / 'nbs').rglob('*.ipynb')):
        if '.ipynb_checkpoints' in nb.parts: continue
        for cell in json.loads(nb.read_text())['cells']:
            m = re.search(r'^#\|\s*default_exp\s+(\S+)', ''.join(cell['source']), re.M)
            if cell['cell_type'] == 'code' and m: found.setdefault(m.group(1), []).append(nb.name)
    return found


def test_version_matches_settings():
    import torchebm
    assert torchebm.__version__ == _settings()['version']


def test_default_exp_unique():
    dupes = {mod: nbs for mod, nbs in _default_exps().items() if len(nbs) > 1}
    assert not dupes, f"notebooks exporting to the same module overwrite each other: {dupes}"


@pytest.mark.parametrize('module', sorted(_default_exps()))
def test_every_exported_module_imports_and_defines_all(module):
    mod = importlib.import_module('torchebm.' + module.removesuffix('.__init__'))
    for name in getattr(mod, '__all__', []):
        assert hasattr(mod, name), f"torchebm.{module}.__all__ names {name!r} but it is not defined"
