"""run layer.

`refusalscope.run` is both this package and the public `rs.run(...)` (api.run): once the package
is imported, Python binds the attribute `run` of refusalscope to it, which would hide the function.
So the package module is callable and forwards to api.run."""

import sys
import types


class _RunPackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from ..api import run

        return run(*args, **kwargs)


sys.modules[__name__].__class__ = _RunPackage
