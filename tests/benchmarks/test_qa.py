"""The QA benchmark's model preparation (SmolLM2 is never converted here)."""

from __future__ import annotations

from benchmarks import qa


def test_smollm2_paths(tmp_path):
    assert qa.smollm2_gguf_path().name == qa.GGUF_FILE
    assert qa.smollm2_gguf_path().is_file()
    assert qa.smollm2_cache_dir(tmp_path) == tmp_path / qa.SMOLLM2_CACHE_NAME
