"""Issue 22, item 10: the compose and .env files a snapshot records keep only values known
to be harmless. A corpus of Immich's own files and a user's changes to them
(tests/data/immich-config: every made-up secret holds `leak<N>`); no secret may appear in
the redacted text, in snapshot.json, in `backup --json` or in any object of the bucket,
and `restore --config-files` still writes files docker compose accepts.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
from pathlib import Path

import pytest

from immich_stream.config import read_dotenv
from immich_stream.host.metadata import SECRET_PLACEHOLDER, redact
from tests.conftest import ImmichStack, _tool
from tests.helpers import Bucket, make_library, run_cli

CORPUS = Path(__file__).parent / "data" / "immich-config"
LEAK = re.compile(r"leak\d+|4821064|40917306")  # the made-up secrets (the PINs are numbers only)
FILES = sorted(p.name for p in CORPUS.iterdir() if p.name != "README.md")


def kind(name: str) -> str:
    return ".env" if name.endswith(".env") else "docker-compose.yml"


def test_the_corpus_holds_secrets_to_find() -> None:
    assert len(LEAK.findall("".join((CORPUS / n).read_text() for n in FILES))) >= 30


@pytest.mark.parametrize("name", FILES)
def test_no_secret_of_the_corpus_survives_redaction(name: str) -> None:
    text, removed = redact(kind(name), (CORPUS / name).read_text())
    assert LEAK.findall(text) == [], text
    if LEAK.search((CORPUS / name).read_text()):
        assert removed and SECRET_PLACEHOLDER in text


@pytest.mark.parametrize("name", ["release.docker-compose.yml", "pgvectors.docker-compose.yml"])
def test_immichs_own_compose_files_are_recorded_unchanged(name: str) -> None:
    original = (CORPUS / name).read_text()
    assert redact("docker-compose.yml", original) == (original, [])


def test_what_a_rebuild_needs_is_kept_and_every_replaced_value_is_named() -> None:
    env, names = redact(".env", (CORPUS / "custom.env").read_text())
    values = read_dotenv_text(env)
    assert values["UPLOAD_LOCATION"] == "/mnt/photos/immich" and values["DB_DATA_LOCATION"] == "/srv/immich/postgres"
    assert (values["IMMICH_VERSION"], values["TZ"], values["DB_USERNAME"], values["DB_PORT"]) == (
        "v1.132.3",
        "Europe/Berlin",
        "immich",
        "5432",
    )
    assert values["DB_PASSWORD_FILE"] == "/run/secrets/db_password"
    for secret in ("DB_URL", "REDIS_URL", "REDIS_PASSWORD", "SMTP_PASS", "API_TOKEN", "UNLOCK_PIN", "MULTI_LINE"):
        assert values[secret] == SECRET_PLACEHOLDER and secret in names
    compose, names = redact("docker-compose.yml", (CORPUS / "custom.docker-compose.yml").read_text())
    for kept in (
        "image: ghcr.io/immich-app/immich-server:${IMMICH_VERSION:-release}",
        "- ${UPLOAD_LOCATION}:/data",
        "source: /mnt/photos",
        "- POSTGRES_USER=${DB_USERNAME}",
        "IMMICH_LOG_LEVEL: verbose",
        "TZ: Europe/Berlin",
    ):
        assert kept in compose
    for secret in ("DB_URL", "REDIS_URL", "SMTP_PASS", "HF_TOKEN", "POSTGRES_PASSWORD", "command", "WEBHOOK"):
        assert secret in names


def read_dotenv_text(text: str, tmp: Path | None = None) -> dict[str, str]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ".env"
        path.write_text(text)
        return read_dotenv(path, {})


def test_redacted_files_are_still_files_docker_compose_accepts(tmp_path: Path) -> None:
    for compose in ("release.docker-compose.yml", "pgvectors.docker-compose.yml", "custom.docker-compose.yml"):
        d = tmp_path / compose
        d.mkdir()
        (d / "docker-compose.yml").write_text(redact("docker-compose.yml", (CORPUS / compose).read_text())[0])
        env = redact(".env", (CORPUS / "custom.env").read_text())[0]
        (d / ".env").write_text("\n".join(ln for ln in env.splitlines() if "=" in ln or ln.startswith("#")) + "\n")
        r = subprocess.run(
            [_tool("docker-compose"), "--project-directory", str(d), "config", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, (compose, r.stderr)


# -- end to end: snapshot.json, backup --json, the bucket, restore --config-files ----------------


def test_no_secret_reaches_snapshot_json_the_json_document_or_the_bucket(
    env: dict[str, str], stack: ImmichStack, bucket: Bucket, tmp_path: Path
) -> None:
    make_library(stack.library, photos=2, odd_names=False)
    dotenv = stack.dir / ".env"
    original = dotenv.read_text()
    extra = "\n".join(
        ln
        for ln in (CORPUS / "custom.env").read_text().splitlines()
        if not ln.startswith(("UPLOAD_LOCATION", "DB_DATA_LOCATION", "DB_USERNAME", "DB_DATABASE_NAME", "DB_PORT"))
        and "broken" not in ln
    )
    dotenv.write_text(original + extra + "\n")
    (stack.dir / "compose.yaml").write_text((CORPUS / "custom.docker-compose.yml").read_text())
    try:
        r = run_cli("backup", "--stop", "none", "--json", env=env)
    finally:
        dotenv.write_text(original)
        (stack.dir / "compose.yaml").unlink()
    assert r.code == 0, r.err
    assert LEAK.findall(r.out + r.err) == []
    assert "test-db-password" not in r.out + r.err
    doc = json.loads(r.out)
    assert doc["exit_code"] == 0
    [sid] = bucket.snapshots()
    everything = b""
    for key in bucket.keys(f"snapshots/{sid}/"):
        data = bucket.get(key)
        everything += gzip.decompress(data) if key.endswith(".gz") else data
    summary = json.loads(bucket.get(f"snapshots/{sid}/snapshot.json"))
    assert set(summary["config_files"]) == {"docker-compose.yml", "compose.yaml", ".env"}
    assert LEAK.findall(everything.decode(errors="replace")) == []
    assert b"test-db-password" not in everything

    out = tmp_path / "rebuild"
    r = run_cli("restore", "latest", "--config-files", "--to", str(out), env=env)
    assert r.code == 0, r.err
    for name in ("DB_PASSWORD", "DB_URL", "REDIS_URL", "SMTP_PASS"):
        assert name in r.out  # named, to be set before `docker compose up`
    restored = read_dotenv(out / ".env", {})
    assert restored["UPLOAD_LOCATION"] == str(stack.library) and restored["DB_URL"] == SECRET_PLACEHOLDER
    assert "image: ghcr.io/immich-app/immich-server:${IMMICH_VERSION:-release}" in (out / "compose.yaml").read_text()
