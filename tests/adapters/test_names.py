"""One adapter-name rule (server/adapters/names.py) for the registry, `train --register` and export manifests."""
from __future__ import annotations

import json

import pytest

from loraplex.export.errors import ExportError
from loraplex.export.manifest import load_manifest
from loraplex.server.adapters.names import MAX_ADAPTER_NAME, adapter_name_problem
from loraplex.server.adapters.source_rules import SourceRule
from loraplex.server.adapters.sources import check_name
from loraplex.server.errors import InvalidArgument


def test_the_registry_takes_64_characters_and_refuses_65():
    assert MAX_ADAPTER_NAME == 64
    assert check_name("a" * 64) == "a" * 64
    for bad in ("a" * 65, "", "-lead", "has space", "dots/../up", "ü"):
        with pytest.raises(InvalidArgument, match="not a valid adapter name"):
            check_name(bad)
    assert "65 characters" in adapter_name_problem("a" * 65)
    assert adapter_name_problem("x" * 200).count("x") < 100  # a long name is cut when shown
    assert SourceRule("*", "hf://o/{name}").source_for("a" * 65) is None


def test_an_export_manifest_refuses_a_name_the_server_would_refuse(tmp_path):
    items = [{"name": "a" * 64, "adapter": "a"}, {"name": "b" * 65, "adapter": "a"}]
    (tmp_path / "m.json").write_text(json.dumps({"items": items}))
    with pytest.raises(ExportError) as caught:
        load_manifest(tmp_path / "m.json")
    assert "is not a valid adapter name" in str(caught.value) and "'a" not in str(caught.value)
