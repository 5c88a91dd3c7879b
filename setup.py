"""Builds the vddk_ext C extension; all other metadata lives in pyproject.toml."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vddk_ext._vddk_ext",
            sources=["vddk_ext/src/blockio.c", "vddk_ext/src/vddk.c", "vddk_ext/src/module.c",
                     "vddk_ext/src/pyvddk.c", "vddk_ext/src/fatal.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-fvisibility=hidden"],
        )
    ]
)
