"""Builds mm_kernels._C, the CPU kernels in csrc/, with torch's cpp_extension and ninja.

Compiler flags live in csrc/compile_flags.txt, read here and by CMakeLists.txt.
"""

from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def compile_flags() -> list[str]:
    lines = (CSRC / "compile_flags.txt").read_text().split("\n")
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))

setup(
    ext_modules=[
        CppExtension(
            name="mm_kernels._C",
            sources=sources,
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": compile_flags()},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
