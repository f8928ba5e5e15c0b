"""Lists loraplex's subpackages and builds the gRPC stubs; the folder mapping lives in pyproject.toml.

The stubs (`loraplex.v1`: *_pb2.py, *_pb2.pyi, *_pb2_grpc.py) are generated from proto/loraplex/v1/*.proto
by grpcio-tools at build time, next to the .proto files (git ignores them), for `pip install .` and
`pip install -e .` alike: an editable install runs build_py too, with nothing to copy.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
MAPPED = {"client": "loraplex.client", "server": "loraplex.server", "training": "loraplex.training",
          "export": "loraplex.export"}
PROTO_ROOT = ROOT / "proto"
PROTO_PACKAGE = "loraplex.v1"


def mapped_packages() -> list[str]:
    packages = []
    for folder, package in MAPPED.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            relative = init.parent.relative_to(ROOT / folder)
            packages.append(".".join([package, *relative.parts]))
    return packages + [PROTO_PACKAGE]


def generate_stubs() -> None:
    """protoc every proto/loraplex/v1/*.proto into Python modules of the package loraplex.v1."""
    import grpc_tools
    from grpc_tools import protoc

    out = PROTO_ROOT / "loraplex" / "v1"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in out.glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files in {out}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={PROTO_ROOT}",
            f"--pyi_out={PROTO_ROOT}", f"--grpc_python_out={PROTO_ROOT}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(protos))
    (out / "__init__.py").write_text('"""Generated from proto/loraplex/v1/*.proto at install time; do not edit."""\n')


class BuildPyWithStubs(build_py):
    def run(self):
        generate_stubs()
        super().run()


setup(packages=mapped_packages(), cmdclass={"build_py": BuildPyWithStubs})
