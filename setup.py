"""Builds gemserve's two C extensions; everything else about the package is in pyproject.toml.

`_output_head` is the output-layer kernel for Q8_0 models (src/gemserve/engine/backends/_output_head.c), `_q5_0`
the kernel for products of Q5_0 matrices inside llama.cpp (`_q5_0.c`). Both are optional: without a C compiler
the package installs without them and llama.cpp computes those products itself.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gemserve.engine.backends._output_head",
            sources=["src/gemserve/engine/backends/_output_head.c"],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,
        ),
        Extension(
            "gemserve.engine.backends._q5_0",
            sources=["src/gemserve/engine/backends/_q5_0.c"],
            depends=["src/gemserve/engine/backends/_q5_0_kernels.h", "src/gemserve/engine/backends/_q6_k_kernels.h",
                     "src/gemserve/engine/backends/_q4_k_kernels.h", "src/gemserve/engine/backends/_attention.h"],
            extra_compile_args=["-O3"],
            libraries=["m"],
            optional=True,
        ),
    ]
)
