"""Compile Triton kernels for Hopper (sm_90) exactly as their launches would, on a machine without a GPU.

A hand-written ``ASTSource`` signature guesses what Triton specialises at a launch, and a guess can hide the
problem it should find: an integer argument is specialised on divisibility by 16 (and == 1), a pointer on
16-byte alignment, and a head stride of 72 is neither -- its kernels then lose vectorised loads, software
pipelining and registers to spills, which a signature that marks every stride "divisible by 16" never shows.
Here the real launch wrapper runs on CPU tensors of the production shapes: Triton's own binder specialises the
arguments, a cache hook compiles the kernel for sm_90 (ptxas included) and skips the launch (so outputs stay
unwritten: only the compiled code is inspected).

Usage (in a process WITHOUT ``TRITON_INTERPRET``, which decides at import time whether kernels compile)::

    with compile_launches_for_hopper() as kernels:
        block_gemm_triton.block_scaled_mm(a, b, sa, sb, torch.bfloat16, None)
    kernels[0].stack_bytes  # 0: no register spills

``compile_in_subprocess(code)`` runs such a snippet from the test process (which interprets) and returns the
kernels it compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.driver import driver

HOPPER = GPUTarget("cuda", 90, 32)
SHARED_MEMORY_PER_BLOCK = 232448  # bytes an H100 block may opt into (227 KB)


@dataclasses.dataclass
class Compiled:
    label: str  # the ``label`` of the kernel list when it was launched
    name: str
    num_warps: int
    num_stages: int
    registers: int  # per thread
    stack_bytes: int  # local memory per thread: register spills (or a local array: 8 B in the amax kernel)
    shared_bytes: int
    ptx: str

    def count(self, pattern: str) -> int:
        """Occurrences of a regular expression in the PTX (e.g. ``wgmma.mma_async``)."""
        return len(re.findall(pattern, self.ptx))


class CompiledKernels(list):
    """The kernels compiled so far; set ``label`` before a group of launches to tag them."""

    label = ""

    def named(self, label: str, name: str) -> Compiled:
        """The kernel ``name`` launched under ``label`` (exactly one)."""
        found = [k for k in self if k.label == label and k.name == name]
        assert len(found) == 1, (label, name, [(k.label, k.name) for k in self])
        return found[0]


class _HopperDriver:
    """The few calls a launch makes to the active driver before it compiles."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return HOPPER

    def get_active_torch_device(self):
        return torch.device("cpu")


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) from the cuobjdump that ships with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", out).groups()
    return int(registers), int(stack)


@contextlib.contextmanager
def compile_launches_for_hopper() -> Iterator[CompiledKernels]:
    """Within the block, every Triton launch compiles its kernel for sm_90 and returns without running it."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_launches_for_hopper needs a process without TRITON_INTERPRET=1")
    compiled = CompiledKernels()
    by_key: dict = {}  # nothing is cached by Triton (no kernel comes back): compile each specialisation once

    def compile_instead_of_launch(*, fn, key, compile, **_):
        options = {name: compile[name] for name in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion")}
        cache_key = (fn.jit_function, key)
        if cache_key not in by_key:
            source = ASTSource(fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0])
            kernel = triton.compile(source, target=HOPPER, options=options)
            registers, stack = _resource_usage(kernel.asm["cubin"])
            by_key[cache_key] = Compiled("", kernel.metadata.name, options["num_warps"], options["num_stages"],
                                         registers, stack, kernel.metadata.shared, kernel.asm["ptx"])
        compiled.append(dataclasses.replace(by_key[cache_key], label=compiled.label))
        return True  # "handled": Triton neither compiles again nor launches

    previous_hook = knobs.runtime.jit_cache_hook
    # restored as it was (reset_active() would create the default driver, which fails without a GPU)
    previous_driver = driver._active
    driver.set_active(_HopperDriver())
    knobs.runtime.jit_cache_hook = compile_instead_of_launch
    try:
        yield compiled
    finally:
        knobs.runtime.jit_cache_hook = previous_hook
        driver._active = previous_driver


def compile_in_subprocess(code: str) -> list[dict]:
    """Run ``code`` (which binds ``kernels`` inside ``with compile_launches_for_hopper() as kernels:``) in a
    fresh interpreter without TRITON_INTERPRET; returns the compiled kernels, each with ``count`` answered
    from the PTX for the patterns in the snippet's ``PATTERNS`` dict (name -> regular expression)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.path.join(root, "tests"), env.get("PYTHONPATH")]))
    program = ("import dataclasses, json, torch\nfrom hopper_compile import compile_launches_for_hopper\n"
               "PATTERNS = {}\n" + code + "\nfor k in kernels:\n"
               "    fields = dataclasses.asdict(k)\n"
               "    fields['ptx'] = {name: k.count(pattern) for name, pattern in PATTERNS.items()}\n"
               "    print('KERNEL', json.dumps(fields))\n")
    done = subprocess.run([sys.executable, "-c", program], env=env, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"compiling for Hopper failed:\n{done.stderr[-4000:]}")
    kernels = CompiledKernels()
    for line in done.stdout.splitlines():
        if line.startswith("KERNEL "):
            fields = json.loads(line[len("KERNEL "):])
            counts = fields.pop("ptx")
            kernels.append(_Counted(**fields, ptx="", counts=counts))
    return kernels


@dataclasses.dataclass
class _Counted(Compiled):
    """A kernel compiled in another process: ``count(name)`` answers for the snippet's PATTERNS by name."""

    counts: dict = dataclasses.field(default_factory=dict)

    def count(self, pattern: str) -> int:
        return self.counts[pattern]
