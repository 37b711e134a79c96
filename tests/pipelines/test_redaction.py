"""The one rule that decides what never leaves the process."""

from __future__ import annotations

import pytest

from pipelines.common.redaction import REDACTED, is_secret_field, redact, redact_url, secret_fields


@pytest.mark.parametrize(
    "name",
    ["key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
     "client_secret", "account_key", "sas_token", "connection_string", "Password", "api-key", "private_key"],
)  # fmt: skip
def test_credential_fields_are_secret(name):
    assert is_secret_field(name)


@pytest.mark.parametrize(
    "name", ["key_column", "endpoint_url", "region_name", "shuffle_block", "keep_checkpoints", "lr", "anon", "profile"]
)
def test_ordinary_fields_are_not(name):
    assert not is_secret_field(name)


def test_redaction_keeps_the_shape_and_everything_else():
    config = {
        "optim": {"lr": 0.1},
        "key_column": "id",
        "storage_options": {"key": "AKIA", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}},
        "tracking": {"uri": "https://alice:pw123@mlflow.example/"},
        "sources": [{"token": "t"}, "s3://bucket/x"],
        "empty": {"token": ""},
    }
    out = redact(config)
    assert out["optim"] == {"lr": 0.1} and out["key_column"] == "id"
    assert out["storage_options"] == {
        "key": REDACTED,
        "secret": REDACTED,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
    }
    assert out["tracking"]["uri"] == f"https://alice:{REDACTED}@mlflow.example/"
    assert out["sources"] == [{"token": REDACTED}, "s3://bucket/x"]
    assert config["storage_options"]["key"] == "AKIA"  # a copy: the process itself keeps its credentials
    dropped = redact(config, drop=True)
    assert dropped["storage_options"] == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert sorted(secret_fields(config)) == [
        "sources[0].token",
        "storage_options.key",
        "storage_options.secret",
        "tracking.uri",
    ]


def test_urls_without_a_password_are_untouched():
    for url in ("s3://bucket/a:b@c", "http://127.0.0.1:5000", "https://user@host/x", "sqlite:////tmp/mlflow.db"):
        assert redact_url(url) == url
