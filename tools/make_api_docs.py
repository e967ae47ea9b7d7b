"""Write docs/api.md: an offline Markdown API reference for cjm_workers.

For every public module it documents the names in `__all__` (in that order, which nbdev writes in source order):
signatures, docstrings, and parameter tables from fastcore's `docments`; for classes also their public methods
(those added later with `@patch` included), dataclass fields and enum members. Each module's one-line description
comes from the title cell of the notebook it is generated from. The output depends only on the code, so running
this twice gives the same file (tests/test_api_docs.py checks that docs/api.md is current).

Run from the repository root: `python tools/make_api_docs.py`
"""
import typing, ast, dataclasses, enum, importlib, inspect, json, re, sys, textwrap
from pathlib import Path
from fastcore.docments import docments

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT/'docs'/'api.md'
MODULES = ['cjm_workers.core.config', 'cjm_workers.core.protocol', 'cjm_workers.core.channel',
           'cjm_workers.core.process', 'cjm_workers.core.worker', 'cjm_workers.core.adapters',
           'cjm_workers.extensions.protocols', 'cjm_workers.extensions.adapters', 'cjm_workers.managers.base',
           'cjm_workers.stores.base', 'cjm_workers.stores.sqlite', 'cjm_workers.stores.sqlite_writer',
           'cjm_workers.remote.plugin', 'cjm_workers.remote.worker', 'cjm_workers.remote.proxy',
           'cjm_workers.remote.adapter', 'cjm_workers.backends.ray', 
           'cjm_workers.fasthtml.sse', 'cjm_workers.fasthtml.components', 'cjm_workers.fasthtml.routes', 'cjm_workers.testing', 'cjm_workers.demo', 'cjm_workers.cli']
MAX_LINE = 88  # longer signatures get one parameter per line
EMPTY = inspect.Parameter.empty


class _Text(str):
    "A string that `inspect.Signature` shows as is (for annotations and defaults already rendered as text)."
    def __repr__(self): return str(self)


# -- small renderers

def _anno_text(anno)->str:
    "An annotation as text ('' if none); under `from __future__ import annotations` most are already source text."
    if anno is EMPTY: return ''
    if not isinstance(anno, str): return inspect.formatannotation(anno)
    quoted = len(anno) > 1 and anno[0] == anno[-1] and anno[0] in '\'"'  # a forward reference such as `->'Foo'`
    return anno[1:-1] if quoted else anno

def _value_text(value, module)->str:
    "A default value as code: literals by repr, enum members and module-level objects by name, never a memory address."
    if isinstance(value, enum.Enum): return f"{type(value).__name__}.{value.name}"
    if value is None or isinstance(value, (bool, int, float, str, bytes)): return repr(value)
    name = next((k for k, v in vars(module).items() if v is value), None)
    return name or re.sub(r' at 0x[0-9a-fA-F]+', '', repr(value))

def _doc(obj)->str:
    "The object's own docstring, cleaned ('' if it has none; unlike `inspect.getdoc`, never a base class's)."
    doc = getattr(obj, '__doc__', None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ''

def _cell(text)->str: return str(text).replace('|', r'\|').replace('\n', ' ')
def _code(text)->str: return f"`{_cell(text)}`" if text else ''

def _table(header:list, rows:list)->list:
    "A Markdown table (no lines at all without rows)."
    if not rows: return []
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return lines + ['| ' + ' | '.join(row) + ' |' for row in rows] + ['']

def _anchor(id_:str)->str: return f'<a id="{id_}"></a>'

def _assignments(source:str, in_class:bool=False)->dict:
    "{name: (statement, trailing comment)} for the assignments at the top level of a module's (or one class's) source."
    source = textwrap.dedent(source)
    tree = ast.parse(source)
    body, lines, out = (tree.body[0].body if in_class else tree.body), source.splitlines(), {}
    ends = [l.encode() for l in re.findall(r'[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z', source)]  # lines as `ast` splits them
    def segment(node):  # `ast.get_source_segment(source, node)`, with the source split once, not once per statement
        first, last = node.lineno - 1, node.end_lineno - 1
        if first == last: return ends[first][node.col_offset:node.end_col_offset].decode()
        return b''.join([ends[first][node.col_offset:], *ends[first + 1:last], ends[last][:node.end_col_offset]]).decode()
    for node in body:
        if isinstance(node, ast.Assign): targets = node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None: targets = [node.target]
        else: continue
        rest = lines[node.end_lineno - 1][node.end_col_offset:].strip()
        comment = rest[1:].strip() if rest.startswith('#') else ''
        for n in (n for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)):
            out[n.id] = (segment(node), comment)
    return out


# -- functions and methods

def _parameters(fn, is_method:bool)->list:
    "`fn`'s parameters as rendered text, the first one (`self`/`cls`) without its annotation for methods."
    module, params = sys.modules[fn.__module__], list(inspect.signature(fn).parameters.values())
    out = [p.replace(annotation=EMPTY if p.annotation is EMPTY else _Text(_anno_text(p.annotation)),
                     default=EMPTY if p.default is EMPTY else _Text(_value_text(p.default, module))) for p in params]
    if is_method and out: out[0] = out[0].replace(annotation=EMPTY)
    return out

def _signature(prefix:str, name:str, params:list, returns:str='')->str:
    "`prefix name(params) -> returns`, with one parameter per line when it gets long."
    parts, kinds = [], [p.kind for p in params]
    for i, p in enumerate(params):
        prev = kinds[i - 1] if i else None
        if prev is p.POSITIONAL_ONLY and p.kind is not p.POSITIONAL_ONLY: parts.append('/')
        if p.kind is p.KEYWORD_ONLY and prev not in (p.KEYWORD_ONLY, p.VAR_POSITIONAL): parts.append('*')
        parts.append(str(p))
    if kinds and kinds[-1] is inspect.Parameter.POSITIONAL_ONLY: parts.append('/')
    tail = f" -> {returns}" if returns else ''
    line = f"{prefix}{name}({', '.join(parts)}){tail}"
    if len(line) <= MAX_LINE: return line
    return f"{prefix}{name}(\n" + ''.join(f"    {p},\n" for p in parts) + f"){tail}"

def _param_rows(fn, is_method:bool)->list:
    "Rows (name, type, default, details) for `fn`'s parameters and return; none if nothing has a docment (as in nbdev)."
    docs = docments(fn, full=True)
    params = _parameters(fn, is_method)[1 if is_method else 0:]
    rows = []
    for p in params:
        stars = {p.VAR_POSITIONAL: '*', p.VAR_KEYWORD: '**'}.get(p.kind, '')
        default = '' if p.default is EMPTY else p.default
        rows.append([_code(stars + p.name), _code(p.annotation if p.annotation is not EMPTY else ''), _code(default),
                     _cell(docs.get(p.name, {}).get('docment') or '')])
    returns, ret_doc = _anno_text(inspect.signature(fn).return_annotation), docs.get('return', {}).get('docment') or ''
    if ret_doc or returns not in ('', 'None'): rows.append(['**Returns**', _code(returns), '', _cell(ret_doc)])
    return rows if any(row[3] for row in rows) else []

def _function(fn, name:str, title:str, id_:str, level:str, is_method:bool=False, decorators:tuple=())->list:
    "Anchor, heading, signature, docstring and parameter table of a function or method."
    prefix = ('async ' if inspect.iscoroutinefunction(fn) else '') + 'def '
    sig = _signature(prefix, name, _parameters(fn, is_method), _anno_text(inspect.signature(fn).return_annotation))
    out = [_anchor(id_), f"{level} {title}", '', '```python', *[f"@{d}" for d in decorators], sig, '```', '']
    if doc := _doc(fn): out += [doc, '']
    return out + _table(['Parameter', 'Type', 'Default', 'Details'], _param_rows(fn, is_method))


# -- classes

def _members(cls)->list:
    "(name, function, decorators) of the public methods and properties of `cls` itself (patched ones too), in order."
    out = []
    for name, attr in vars(cls).items():
        if name.startswith('_') and name != '__init__': continue
        decorators = ('abstractmethod',) if getattr(attr, '__isabstractmethod__', False) else ()
        if isinstance(attr, property): fn, decorators = attr.fget, ('property',) + decorators
        elif isinstance(attr, (classmethod, staticmethod)):
            fn, decorators = attr.__func__, (type(attr).__name__,) + decorators
        else: fn = attr
        if not inspect.isfunction(fn): continue
        # a class's own `__init__` only: not a dataclass's generated one, nor the one `Protocol` puts in every protocol
        own_init = not dataclasses.is_dataclass(cls) and fn.__qualname__ == f"{cls.__qualname__}.__init__"
        if name == '__init__' and not own_init: continue
        out.append((name, fn, decorators))
    return out

def _field_rows(cls)->list:
    "Rows (name, type, default, details) for a dataclass's fields, with each field's comment from where it is defined."
    docs, module = {}, sys.modules[cls.__module__]
    for base in reversed(cls.__mro__):  # docments of a subclass does not see its base's comments
        if dataclasses.is_dataclass(base):
            own = docments(base, full=True)
            docs.update({k: own[k]['docment'] for k in vars(base).get('__annotations__', {}) if k in own})
    rows = []
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING: default = f"{f.default_factory.__qualname__}()"
        elif f.default is not dataclasses.MISSING: default = _value_text(f.default, module)
        else: default = ''
        rows.append([_code(f.name), _code(_anno_text(f.type)), _code(default), _cell(docs.get(f.name) or '')])
    return rows

def _enum_rows(cls)->list:
    "Rows (name, value, details) for an enum's members, with the comment that follows each one in the source."
    comments = _assignments(inspect.getsource(cls), in_class=True)
    return [[_code(m.name), _code(repr(m.value)), _cell(comments.get(m.name, ('', ''))[1])] for m in cls]

def _base_name(b)->str:
    "A base class as the source names it: `Generic[JobType]`, not `Generic`."
    if isinstance(b, type): return b.__qualname__
    args = ', '.join(getattr(a, '__name__', repr(a)) for a in typing.get_args(b))
    return f"{getattr(typing.get_origin(b), '__qualname__', repr(b))}[{args}]"

def _class(cls, name:str, id_:str)->list:
    "A class: its docstring, enum members or dataclass fields, then its `__init__` and public methods."
    bases = ', '.join(_base_name(b) for b in cls.__dict__.get('__orig_bases__', cls.__bases__) if b is not object)
    out = [_anchor(id_), f"### {name}", '', '```python', *(['@dataclass'] if dataclasses.is_dataclass(cls) else []),
           f"class {name}" + (f"({bases})" if bases else ''), '```', '']
    if doc := _doc(cls): out += [doc, '']
    if issubclass(cls, enum.Enum): out += _table(['Member', 'Value', 'Details'], _enum_rows(cls))
    elif dataclasses.is_dataclass(cls): out += _table(['Field', 'Type', 'Default', 'Details'], _field_rows(cls))
    for m_name, fn, decorators in _members(cls):
        out += _function(fn, m_name, f"{name}.{m_name}", f"{id_}.{m_name}", '####',
                         is_method='staticmethod' not in decorators, decorators=decorators)
    return out


# -- modules

def _variable(module, name:str, id_:str)->list:
    "A module-level name that is neither class nor function: the statement assigning it and its trailing comment."
    fallback = (f"{name} = {_value_text(getattr(module, name), module)}", '')
    statement, comment = _assignments(inspect.getsource(module)).get(name, fallback)
    return [_anchor(id_), f"### {name}", '', '```python', statement, '```', ''] + ([comment, ''] if comment else [])

def _notebook(module)->Path:
    "The notebook a module is generated from (nbdev names it in the module's `AUTOGENERATED` line)."
    nb = re.search(r'File to edit: (\S+\.ipynb)', inspect.getsource(module)).group(1)
    return (Path(module.__file__).parent/nb).resolve()

def _description(module)->str:
    "The `> description` of the notebook's title cell (`# title` then `> description`, possibly over several lines)."
    cells = json.loads(_notebook(module).read_text(encoding='utf-8'))['cells']
    title = ''.join(next(c for c in cells if c['cell_type'] == 'markdown')['source'])
    return ' '.join(line[1:].strip() for line in title.splitlines() if line.startswith('>'))

def _module(module)->list:
    "A module's section: description, source notebook, links to its names, then each name in `__all__` order."
    mod, notebook = module.__name__, _notebook(module).relative_to(ROOT).as_posix()
    out = [_anchor(mod), f"## {mod}", '', f"> {_description(module)}", '', f"Source notebook: `{notebook}`", '',
           ' · '.join(f"[{n}](#{mod}.{n})" for n in module.__all__), '']
    for name in module.__all__:
        obj, id_ = getattr(module, name), f"{mod}.{name}"
        if inspect.isclass(obj): out += _class(obj, name, id_)
        elif inspect.isfunction(obj): out += _function(obj, name, name, id_, '###')
        else: out += _variable(module, name, id_)
    return out

def render()->str:
    "The whole reference, as Markdown."
    modules = [importlib.import_module(m) for m in MODULES]
    out = ['# cjm_workers API reference', '',
           'Generated from the docstrings and docments of the code by `tools/make_api_docs.py`; '
           'do not edit by hand (run `python tools/make_api_docs.py`).', '', '## Contents', '']
    out += [f"- [{m.__name__}](#{m.__name__}): {_description(m)}" for m in modules] + ['']
    for m in modules: out += _module(m)
    return '\n'.join(out).rstrip('\n') + '\n'

def main(out_path=None)->Path:
    "Write the reference to `out_path` (default: docs/api.md) and return that path."
    out_path = Path(out_path or DEFAULT_OUT)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(render(), encoding='utf-8', newline='\n')
    return out_path

if __name__ == '__main__':
    main()
    print("wrote docs/api.md")
