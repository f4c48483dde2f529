import pytest


@pytest.fixture(autouse=True)
def isolated_base_dir(tmp_path, monkeypatch):
    """No test reads or writes the user's ~/.cache/nanochat: each gets its own NANOCHAT_BASE_DIR."""
    base_dir = tmp_path / "nanochat_base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    return base_dir
