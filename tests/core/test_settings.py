"""medcls.core.settings: environment, then secrets.toml, then default; one typed error for a bad
value; a new setting is one field."""

from __future__ import annotations

from dataclasses import dataclass, fields

import pytest

from medcls.core.errors import SettingsError
from medcls.core.settings import PROJECT_DIR, Settings, load_settings, read_secrets_file, setting


def test_environment_then_secrets_then_default(tmp_path):
    secrets = {"scan_root": str(tmp_path / "from-secrets"), "models_dir": "relative/models",
               "pacs": {"url": "http://pacs.local/dicom-web", "timeout": 5}}
    s = load_settings(env={"MEDCLS_SCAN_ROOT": str(tmp_path / "from-env"), "MEDCLS_MODELS": ""},
                      secrets=secrets)
    assert s.scan_root == tmp_path / "from-env"  # environment wins
    assert s.models_dir == PROJECT_DIR / "relative" / "models"  # empty env = unset; relative path
    assert s.pacs.url == "http://pacs.local/dicom-web" and s.pacs.timeout == 5.0
    d = load_settings(env={}, secrets={})
    assert d.models_dir == PROJECT_DIR / "models" and d.scan_root == PROJECT_DIR / "scans"
    assert d.database_url is None and d.ray_address is None and d.pacs.timeout == 30.0


def test_lists_and_maps_from_text_or_toml():
    env = {"MEDCLS_AUTH_ALLOW": "ana, ben ,", "MEDCLS_AUTH_ROLES": "ana=clinician,ben=engineer"}
    s = load_settings(env=env, secrets={})
    assert s.auth.allow == ("ana", "ben")
    assert s.auth.roles == {"ana": "clinician", "ben": "engineer"}
    t = load_settings(env={}, secrets={"auth": {"allow": ["cy"], "roles": {"cy": "clinician"}}})
    assert t.auth.allow == ("cy",) and t.auth.roles == {"cy": "clinician"}


def test_bad_values_raise_a_typed_error_without_the_value():
    with pytest.raises(SettingsError, match="MEDCLS_PACS_TIMEOUT") as info:
        load_settings(env={"MEDCLS_PACS_TIMEOUT": "s3cret-typo"}, secrets={})
    assert "s3cret-typo" not in str(info.value)
    with pytest.raises(SettingsError, match="pacs.timeout"):
        load_settings(env={}, secrets={"pacs": {"timeout": -1}})


def test_secrets_file_and_secrets_stay_out_of_repr(tmp_path):
    path = tmp_path / "secrets.toml"
    path.write_text('database_url = "postgresql://x"\n[pacs]\npassword = "hunter2"\n')
    s = load_settings(env={}, secrets=read_secrets_file(path))
    assert s.database_url == "postgresql://x" and s.pacs.password == "hunter2"
    assert "hunter2" not in repr(s)
    assert read_secrets_file(tmp_path / "none.toml") == {}
    path.write_text("not = [toml")
    with pytest.raises(SettingsError):
        read_secrets_file(path)


def test_a_new_setting_is_one_field():
    @dataclass(frozen=True)
    class Extended(Settings):
        workers: int = setting("MEDCLS_TEST_WORKERS", "workers", 2, int)

    from medcls.core.settings import _build

    assert _build(Extended, {"MEDCLS_TEST_WORKERS": "8"}, {}, "").workers == 8
    assert _build(Extended, {}, {"workers": 3}, "").workers == 3
    every = {f.name for f in fields(Settings)}
    assert {"models_dir", "scan_root", "database_url", "ray_address", "pacs", "auth"} <= every
