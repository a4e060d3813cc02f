"""Builds gemserve's one C extension; everything else about the package is in pyproject.toml.

`_output_head` is the output-layer kernel for Q8_0 models (src/gemserve/engine/backends/_output_head.c). It is
optional: without a C compiler the package installs without it and llama.cpp computes the logits itself.
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
        )
    ]
)
