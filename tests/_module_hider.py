"""Source code that makes modules look not installed, for a subprocess.

Run before anything else in a fresh interpreter (as `-c` code or as a module
loaded with `pytest -p`), it wraps every finder on sys.meta_path so that the
named modules and their submodules are not found: `import` raises
ModuleNotFoundError and importlib.util.find_spec gives None, as in an
environment without them. Names already imported are dropped first.
"""

_TEMPLATE = '''
import sys

HIDDEN = %r


def _hidden(name):
    return any(name == h or name.startswith(h + ".") for h in HIDDEN)


class _Hide:
    def __init__(self, inner):
        self._inner = inner

    def find_spec(self, name, path=None, target=None):
        if _hidden(name):
            return None
        find = getattr(self._inner, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attr):
        return getattr(self._inner, attr)


for _m in [m for m in sys.modules if _hidden(m)]:
    del sys.modules[_m]
sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
'''


def hider_source(hidden) -> str:
    """Python source hiding the modules named in `hidden` (an iterable of
    dotted names) from the import system of the interpreter that runs it."""
    return _TEMPLATE % (tuple(hidden),)
