"""The forward query kernels keep their per-query state in registers and shared memory: no stack
frame (local memory) in nvcc's ptxas report of the build, build/ptxas-report.log, which
tools/setup_env.sh writes whenever it compiles the CUDA kernels (as CI does on every run). The
geometry once collected a query's neighbours in an array indexed by a runtime count, which put 144
bytes of local memory in every forward kernel; spills are build errors (-warn-spills -Werror), a
stack frame is not."""

import os
import re

import pytest

from conftest import ROOT

REPORT = os.path.join(ROOT, "build", "ptxas-report.log")
ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
STACK = re.compile(r"(\d+) bytes cumulative stack size")


def kernel_stacks(lines):
    """{(mangled kernel name, architecture): bytes of stack} from ptxas -v lines ('Compiling entry
    function' then its 'Used ... registers' line, which names a stack only when there is one)."""
    stacks, current = {}, None
    for line in lines:
        entry = ENTRY.search(line)
        if entry:
            current = entry.groups()
            stacks[current] = 0
        elif current is not None and "Used" in line:
            stack = STACK.search(line)
            stacks[current] = int(stack.group(1)) if stack else 0
            current = None
    return stacks


def forward_kernels(stacks):
    """The forward query kernels (liif::cuda::liif_query_*_kernel; the backward ones are
    backward_*)."""
    return {key: size for key, size in stacks.items() if re.search(r"\d+liif_query_\w+_kernel", key[0])}


def test_the_parser_finds_a_stack_frame():
    lines = [
        "ptxas info    : Compiling entry function '_ZN4liif4cuda22liif_query_fast_kernelENS0_17QueryKernelParamsIfEE' for 'sm_90a'",
        "ptxas info    : Used 128 registers, used 1 barriers, 144 bytes cumulative stack size, 816 bytes cmem[0]",
        "ptxas info    : Compiling entry function '_ZN4liif4cuda21backward_blend_kernelIdEEvNS0_19BackwardChunkParamsIT_EE' for 'sm_80'",
        "ptxas info    : Used 32 registers, used 0 barriers, 704 bytes cmem[0]",
    ]
    stacks = kernel_stacks(lines)
    assert stacks == {
        ("_ZN4liif4cuda22liif_query_fast_kernelENS0_17QueryKernelParamsIfEE", "sm_90a"): 144,
        ("_ZN4liif4cuda21backward_blend_kernelIdEEvNS0_19BackwardChunkParamsIT_EE", "sm_80"): 0,
    }
    assert list(forward_kernels(stacks).values()) == [144]


def fresh_report():
    """The report's lines, or a skip when there is none or it is older than the CUDA sources."""
    if not os.path.exists(REPORT):
        pytest.skip("no build/ptxas-report.log: the CUDA kernels were not built by tools/setup_env.sh "
                    "in this checkout")
    sources = [os.path.join(folder, name)
               for folder, _, names in os.walk(os.path.join(ROOT, "csrc"))
               for name in names if name.endswith((".h", ".cuh", ".cu"))]
    if os.path.getmtime(REPORT) < max(os.path.getmtime(path) for path in sources):
        pytest.skip("build/ptxas-report.log is older than the CUDA sources: rerun tools/setup_env.sh")
    with open(REPORT) as report:
        return report.read().splitlines()


def test_forward_kernels_use_no_local_memory():
    forward = forward_kernels(kernel_stacks(fresh_report()))
    assert forward, "no forward query kernel in build/ptxas-report.log"
    with_stack = {f"{name} ({arch})": size for (name, arch), size in forward.items() if size}
    assert not with_stack, f"forward kernels with a stack frame (bytes): {with_stack}"
