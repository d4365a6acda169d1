"""Only the native reader needs setup.py: setup.cfg cannot say "build this C extension, and if
there is no compiler, install anyway" (the Python side then logs which fallback it uses)."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # no compiler, no headers: the package still installs
            print(f"zeroinf: native reader not built ({e}); a Python reader backend will be used")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:
            print(f"zeroinf: native reader not built ({e}); a Python reader backend will be used")


setup(
    ext_modules=[
        Extension(
            "zeroinf._native_aio",
            sources=["native/aio.c"],
            extra_compile_args=["-O2", "-Wall", "-std=gnu11"],
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
