"""Generate the Python gRPC stubs from protos/ into llamafleet/v1/ and llamafleet/seaweedfs/ (or
check they are current).

Usage: python scripts/gen_protos.py [--check]
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
# Our contracts, and the part of SeaweedFS's filer API that storage calls (vendored).
PACKAGE_DIRS = (Path("llamafleet") / "v1", Path("llamafleet") / "seaweedfs")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over every proto of the packages; returns the generated files."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for d in PACKAGE_DIRS for p in (PROTO_ROOT / d).glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for d in PACKAGE_DIRS for p in (out_dir / d).glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the checked-in stubs differ")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # Keyed by the path under the repository root, e.g. llamafleet/v1/storage_pb2.py.
        fresh = {p.relative_to(tmp): p for p in generate(Path(tmp))}
        current = {p.relative_to(ROOT): p for d in PACKAGE_DIRS for p in (ROOT / d).glob("*_pb2*.py*")}
        if args.check:
            stale = sorted(
                str(name)
                for name in fresh.keys() | current.keys()
                if name not in fresh
                or name not in current
                or not filecmp.cmp(fresh[name], current[name], shallow=False)
            )
            if stale:
                print(f"generated code is out of date ({', '.join(stale)}): run `make protos`", file=sys.stderr)
                return 1
            return 0
        for name in current.keys() - fresh.keys():
            current[name].unlink()
        for name, path in fresh.items():
            (ROOT / name).write_bytes(path.read_bytes())
    print(f"wrote {len(fresh)} files to {', '.join(map(str, PACKAGE_DIRS))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
