"""Unit tests of immich_stream/host/metadata.py: secrets redacted from the recorded config files."""

from __future__ import annotations


def test_secrets_are_removed_from_config_files() -> None:
    from immich_stream.host.metadata import SECRET_PLACEHOLDER as P
    from immich_stream.host.metadata import redact

    env = "DB_PASSWORD=hunter2\nexport API_KEY='k'\nUPLOAD_LOCATION=./library\n# DB_PASSWORD=old\n"
    text, names = redact(".env", env)
    assert text == f"DB_PASSWORD={P}\nexport API_KEY={P}\nUPLOAD_LOCATION=./library\n# DB_PASSWORD={P}\n"
    assert names == ["DB_PASSWORD", "API_KEY"]
    compose = (
        "    environment:\n      POSTGRES_PASSWORD: ${DB_PASSWORD}\n      REDIS_PASSWORD: s3cret\n"
        "      - JWT_SECRET=abc\n    image: x:${IMMICH_VERSION:-release}\n"
    )
    text, names = redact("docker-compose.yml", compose)
    assert (
        "s3cret" not in text
        and "abc" not in text
        and "${DB_PASSWORD}" in text
        and names == ["REDIS_PASSWORD", "JWT_SECRET"]
    )
