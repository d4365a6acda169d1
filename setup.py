"""Only the native code needs setup.py: setup.cfg cannot say "build these C extensions, and if
there is no compiler, install anyway" (the Python side then logs which fallback it uses): the
reader (native/aio.c) and the host KV tier's decode attention (native/host_attn.c)."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # no compiler, no headers: the package still installs
            print(f"zeroinf: native code not built ({e}); Python fallbacks will be used")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:
            print(f"zeroinf: {ext.name} not built ({e}); its Python fallback will be used")


setup(
    ext_modules=[
        Extension(
            "zeroinf._native_aio",
            sources=["native/aio.c"],
            extra_compile_args=["-O2", "-Wall", "-std=gnu11"],
        ),
        Extension(
            "zeroinf._native_attn",
            sources=["native/host_attn.c"],
            extra_compile_args=["-O3", "-Wall", "-std=gnu11", "-pthread"],
            extra_link_args=["-pthread", "-ldl"],
        ),
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
