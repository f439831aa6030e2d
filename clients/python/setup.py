"""Generates the gRPC modules and their type stubs from the bucket's proto/.

Everything else about the package is in pyproject.toml. The generated files
go to prana_bucket/_gen/ (ignored by git) before the build copies the
package, so an in-tree build, an editable install and mypy on the sources
all see them; an sdist carries a copy of the .proto files so that a wheel
can be built from it away from the repository.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import ClassVar

from setuptools import Command, setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
GEN = HERE / "prana_bucket" / "_gen"
# The generated modules import each other by the path their .proto file had
# under the include root. Staging the contract under prana_bucket/_gen/
# makes those imports absolute inside this package (no top-level `bucket`
# module to collide with anything), without rewriting generated code.
STAGE_PREFIX = Path("prana_bucket") / "_gen"


def proto_root() -> Path:
    """The proto/ directory: the sdist's copy, else the repository's."""
    override = os.environ.get("PRANA_BUCKET_PROTO_DIR")
    for candidate in ([Path(override)] if override else []) + [
        HERE / "proto",
        HERE.parent.parent / "proto",
    ]:
        if (candidate / "bucket" / "v1" / "bucket.proto").is_file():
            return candidate
    raise FileNotFoundError(
        "bucket/v1/bucket.proto not found: build from the repository "
        "(clients/python) or from an sdist, or set PRANA_BUCKET_PROTO_DIR"
    )


def plugin(name: str) -> str:
    """A protoc plugin's path: the build environment's scripts come first,
    since a build run without an activated venv does not have them on PATH."""
    scripts = sysconfig.get_path("scripts")
    found = shutil.which(name, path=scripts) or shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found (is mypy-protobuf installed?)")
    return found


def generate() -> None:
    # Imported here: only building needs them (pyproject's build requires).
    import grpc_tools  # noqa: PLC0415
    from grpc_tools import protoc  # noqa: PLC0415

    root = proto_root()
    protos = sorted(root.rglob("*.proto"))
    shutil.rmtree(GEN, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        staged = []
        for proto in protos:
            target = stage / STAGE_PREFIX / proto.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(proto, target)
            staged.append(str(target.relative_to(stage)))
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{stage}",
            f"-I{well_known}",
            f"--plugin=protoc-gen-mypy={plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={HERE}",
            f"--grpc_python_out={HERE}",
            f"--mypy_out={HERE}",
            f"--mypy_grpc_out={HERE}",
            *staged,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
    # Packages for every generated directory, so imports and package data
    # find them.
    for directory in [GEN, *(p for p in GEN.rglob("*") if p.is_dir())]:
        if directory.name != "__pycache__":
            (directory / "__init__.py").touch()
    (GEN / "__init__.py").write_text(
        '"""Generated from proto/ by setup.py at build time; do not edit."""\n'
    )


class GenerateProto(Command):
    """`python setup.py generate_proto`: regenerate prana_bucket/_gen/ alone."""

    description = "generate the gRPC modules and stubs from proto/"
    user_options: ClassVar[list[tuple[str, str | None, str]]] = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        generate()


class BuildPy(build_py):
    def run(self) -> None:
        generate()
        # The package list was computed before _gen/ existed.
        generated = {
            ".".join(init.parent.relative_to(HERE).parts) for init in GEN.rglob("__init__.py")
        }
        self.packages = sorted({*(self.packages or []), *generated})
        super().run()


class Sdist(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        shutil.copytree(proto_root(), Path(base_dir) / "proto", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPy, "sdist": Sdist, "generate_proto": GenerateProto})
