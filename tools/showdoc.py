"""`show_doc` signatures that read as in the code: applied by `tools/docs_offline.py` and `tools/run_nbs.py`.

fastcore 1.12's `DocmentText` writes every signature as `def name(`, replaces each annotation by its bare
`__name__` (`Union`, `Optional`), infers `NoneType` from a `None` default and prints `*args` as
`args:VAR_POSITIONAL`. `patch()` replaces its text with the parameters as written in the source (annotations
and defaults copied verbatim through `ast`), keeping the one-comment-per-argument docments layout; classes
read `ClassName(...)`, functions `def name(...) -> ret:`. Objects without source (dataclass `__init__`,
builtins) fall back to `inspect.signature`. It also mends `[source]` links that point at `#LNone`.
"""
import ast
import inspect
import re
import textwrap

from fastcore import docments as _docments
from nbdev import showdoc as _showdoc

MAXLINE = 110


def _function_of(obj):
    "The function whose parameters document `obj` (a class documents its `__init__`), and whether it is a class."
    if inspect.isclass(obj): return obj.__init__, True
    return obj, False


def _is_method(func) -> bool:
    return '.' in getattr(func, '__qualname__', '') and '<locals>' not in func.__qualname__.rsplit('.', 1)[0]


def _source_parameters(func):
    "`([parameter text, ...], return annotation text or None)` copied from `func`'s source, or None."
    try: src = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError): return None
    try: tree = ast.parse(src)
    except SyntaxError: return None
    node = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if node is None or node.name != func.__name__: return None
    seg = lambda n: ast.get_source_segment(src, n)
    def fmt(a, d=None):   # PEP 8: `x: int = 3` but `x=3`
        if a.annotation: return f'{a.arg}: {seg(a.annotation)}' + (f' = {seg(d)}' if d is not None else '')
        return a.arg + (f'={seg(d)}' if d is not None else '')
    args = node.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = [(a.arg, fmt(a, d)) for a, d in zip(positional, defaults)]
    if args.posonlyargs: params.insert(len(args.posonlyargs), (None, '/'))
    if args.vararg: params.append((args.vararg.arg, '*' + fmt(args.vararg)))
    elif args.kwonlyargs: params.append((None, '*'))
    params += [(a.arg, fmt(a, d)) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg: params.append((args.kwarg.arg, '**' + fmt(args.kwarg)))
    return params, (seg(node.returns) if node.returns else None)


def _signature_parameters(obj):
    "The same from `inspect.signature` (annotations through `inspect.formatannotation`), or None."
    try: sig = inspect.signature(obj)
    except (TypeError, ValueError): return None
    params, kind = [], None
    for p in sig.parameters.values():
        if p.kind == p.KEYWORD_ONLY and kind not in (p.KEYWORD_ONLY, p.VAR_POSITIONAL): params.append((None, '*'))
        if kind == p.POSITIONAL_ONLY and p.kind != p.POSITIONAL_ONLY: params.append((None, '/'))
        kind = p.kind
        params.append((p.name, str(p).replace("'", '')))
    if kind == inspect.Parameter.POSITIONAL_ONLY: params.append((None, '/'))
    ret = sig.return_annotation
    return params, (None if ret is inspect.Signature.empty else inspect.formatannotation(ret))


def signature_text(obj, maxline: int = MAXLINE) -> str:
    "`obj`'s signature as in its source, with one `# comment` per documented argument (fastcore's docments)."
    func, is_class = _function_of(obj)
    parsed = _source_parameters(func) if inspect.isfunction(func) else None
    if parsed is None:
        parsed = _signature_parameters(obj)
        if parsed is None: return f'{obj.__name__}(...)' if is_class else f'def {getattr(obj, "__name__", obj)}(...)'
        skip_self = False
    else: skip_self = is_class or _is_method(func)
    params, ret = parsed
    if skip_self and params and params[0][0] in ('self', 'cls'): params = params[1:]
    try: comments = _docments.docments(obj) or {}
    except Exception: comments = {}
    lines, current = [], []
    for name, text in params:
        comment = comments.get(name) if name else None
        if current and len(', '.join(current + [text])) + 4 > maxline:
            lines.append(', '.join(current) + ','); current = []
        current.append(text)
        if comment: lines.append(', '.join(current) + ', # ' + ' '.join(str(comment).split())); current = []
    if current: lines.append(', '.join(current))
    name = obj.__name__
    head, tail = (f'{name}(', ')') if is_class else (f'def {name}(', f'){" -> " + ret if ret else ""}:')
    if not lines: return head + tail
    if len(lines) == 1 and '#' not in lines[0] and len(head + lines[0] + tail) <= maxline:
        return head + lines[0] + tail
    return head + '\n    ' + '\n    '.join(lines) + '\n' + tail


def _docment_text(self): return signature_text(self.obj, getattr(self, 'maxline', MAXLINE))


_LNONE = re.compile(r'#LNone\)')


def _markdown_with_source_line(self):
    text = _original_markdown(self)
    if '#LNone)' in text:
        try: line = inspect.getsourcelines(inspect.unwrap(self.sym))[1]
        except (OSError, TypeError): line = None
        text = _LNONE.sub(f'#L{line})' if line else ')', text)
    return text


_original_markdown = _showdoc.BasicMarkdownRenderer._repr_markdown_
fastcore_text = _docments.DocmentText.__str__   # fastcore's own text, kept for the tests' broken variant


def patch() -> None:
    "Route every `show_doc` signature through `signature_text` (idempotent)."
    _docments.DocmentText.__str__ = _docments.DocmentText.__repr__ = _docment_text
    _showdoc.BasicMarkdownRenderer._repr_markdown_ = _markdown_with_source_line
