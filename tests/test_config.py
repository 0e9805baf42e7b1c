"""gatekeeper.yaml: defaults, paths relative to the file, every problem located, secrets."""

from __future__ import annotations

import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from gatekeeper.config import (
    Config,
    ConfigError,
    DeliveryPolicy,
    find_default_config,
    load_config,
    parse_listen,
    resolve_secrets,
)

GOOD_CONFIG = Path(__file__).parent / "data" / "good_rules" / "gatekeeper.yaml"


def write_config(folder: Path, text: str) -> Path:
    path = folder / "gatekeeper.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path) -> list[tuple[int, int, str, str]]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [(p.line, p.column, p.path, p.message) for p in caught.value.problems]


def test_no_config_means_defaults_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8080)
    assert config.database == tmp_path / "gatekeeper.db"
    assert config.rules_dir == tmp_path / "rules"
    assert config.max_body_bytes == 1024 * 1024
    assert (config.targets, config.escrows, config.path) == ({}, {}, None)


def test_empty_file_means_defaults_relative_to_its_folder(tmp_path: Path) -> None:
    path = write_config(tmp_path, "# nothing set\n")
    config = load_config(path)
    assert config.rules_dir == tmp_path / "rules"
    assert config.path == path


def test_paths_are_resolved_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "deploy").mkdir()
    monkeypatch.chdir(tmp_path)
    absolute = tmp_path / "elsewhere" / "gk.db"
    write_config(
        tmp_path / "deploy",
        f"""\
        database: {absolute}
        rules_dir: ../rules
        """,
    )
    config = load_config(Path("deploy/gatekeeper.yaml"))
    assert config.database == absolute
    assert config.rules_dir == tmp_path / "deploy" / ".." / "rules"
    assert config.rules_dir.resolve() == tmp_path / "rules"


def test_full_config_is_typed() -> None:
    config = load_config(GOOD_CONFIG)
    bank = config.targets["escrow-bank"]
    assert (bank.url, bank.secret_env, bank.kind, bank.format) == (
        "https://bank.example/api/releases",
        "ESCROW_BANK_SECRET",
        "webhook",
        "json",
    )
    assert bank.delivery == DeliveryPolicy(12, 86400.0, 5.0, 3600.0, 15.0)
    assert isinstance(bank.delivery.max_age_s, float)
    assert config.targets["finance-chat"].format == "slack"
    assert config.targets["finance-chat"].delivery == DeliveryPolicy()
    escrow = config.escrows["tower-a-escrow"]
    assert (escrow.currency, escrow.limit) == ("USD", Decimal("50000.00"))


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9000", ("::1", 9000)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_listen_is_host_and_port(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize(
    ("listen", "fragment"),
    [
        ("localhost", "is not host:port"),
        (":8080", "is not host:port"),
        ("host:http", "is not host:port"),
        ("host:70000", "port 70000 is not in 0..65535"),
        ("::1:8080", "put an IPv6 address in brackets"),
    ],
)
def test_bad_listen_is_located(tmp_path: Path, listen: str, fragment: str) -> None:
    path = write_config(tmp_path, f'database: x.db\nlisten: "{listen}"\n')
    [(line, column, key, message)] = problems_of(path)
    assert (line, column, key) == (2, 9, "listen")
    assert fragment in message


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """\
        listen: 127.0.0.1:8080
        secrets:
          - {name: bank, value: abc}
        """,
    )
    [(line, column, key, message)] = problems_of(path)
    assert (line, column, key) == (2, 1, "secrets")
    assert message.startswith("unknown key 'secrets' (allowed: listen, database, rules_dir,")


def test_every_problem_is_reported(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """\
        listen: nowhere
        max_body_bytes: 0
        targets:
          Bank:
            url: ftp://bank.example
            secret_env: bank-secret
            format: xml
            delivery: {backoff_base_s: 10, backoff_cap_s: 5, max_attempts: 0, retries: 3}
          chat: {secret_env: CHAT}
        escrows:
          tower-a-escrow: {currency: usd, limit: 20000.00}
        """,
    )
    found = problems_of(path)
    assert [(line, key) for line, _, key, _ in found] == [
        (1, "listen"),
        (2, "max_body_bytes"),
        (4, "targets.Bank"),
        (5, "targets.Bank.url"),
        (6, "targets.Bank.secret_env"),
        (7, "targets.Bank.format"),
        (8, "targets.Bank.delivery.backoff_base_s"),
        (8, "targets.Bank.delivery.max_attempts"),
        (8, "targets.Bank.delivery.retries"),
        (9, "targets.chat"),
        (11, "escrows.tower-a-escrow.currency"),
        (11, "escrows.tower-a-escrow.limit"),
    ]
    messages = {key: message for _, _, key, message in found}
    assert messages["targets.Bank"].startswith("'Bank' is not a valid target name")
    assert messages["targets.Bank.url"] == (
        "'ftp://bank.example' is not an http(s) URL (e.g. https://bank.example/api/releases)"
    )
    assert messages["targets.Bank.format"] == "must be one of: json, slack (got the string 'xml')"
    assert messages["targets.chat"] == "missing required key 'url'"
    assert messages["max_body_bytes"] == "must be at least 1 (got 0)"
    assert 'quote it: "20000.00"' in messages["escrows.tower-a-escrow.limit"]


def test_yaml_syntax_error_is_located(tmp_path: Path) -> None:
    path = write_config(tmp_path, "targets: {a: 1\nlisten: x\n")
    [(line, _, _, message)] = problems_of(path)
    assert line == 2
    assert message.startswith("invalid YAML:")


def test_not_a_mapping_and_missing_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "- listen\n")
    assert "must be a mapping of settings" in problems_of(path)[0][3]
    [(line, _, _, message)] = problems_of(tmp_path / "missing.yaml")
    assert line == 0
    assert message.startswith("cannot read the config file")


def test_missing_secrets_name_the_variable_never_a_value() -> None:
    config = load_config(GOOD_CONFIG)
    environ = {"ESCROW_BANK_SECRET": "whsec_top-secret-value", "CI_SECRET": ""}
    with pytest.raises(ConfigError) as caught:
        resolve_secrets(config, environ)
    messages = [p.message for p in caught.value.problems]
    assert messages == [
        "environment variable CHAT_SECRET is not set "
        "(needed by targets 'finance-chat', 'site-ops')",
        "environment variable CI_SECRET is set but empty (needed by target 'ci-construction-docs')",
    ]
    assert "top-secret" not in str(caught.value)
    assert caught.value.problems[0].file == str(GOOD_CONFIG)


def test_secrets_resolve_per_target() -> None:
    config = load_config(GOOD_CONFIG)
    environ = {"ESCROW_BANK_SECRET": "a", "CHAT_SECRET": "b", "CI_SECRET": "c", "OTHER": "d"}
    assert resolve_secrets(config, environ) == {
        "escrow-bank": "a",
        "finance-chat": "b",
        "site-ops": "b",
        "ci-construction-docs": "c",
    }
    assert resolve_secrets(Config(), {}) == {}


def test_find_default_config(tmp_path: Path) -> None:
    assert find_default_config(tmp_path) is None
    path = write_config(tmp_path, "")
    assert find_default_config(tmp_path) == path


def test_a_postgresql_url_is_kept_as_written(tmp_path: Path) -> None:
    for url in ("postgresql://gk@db.example:5432/gatekeeper", "postgres://gk@db/gk"):
        assert load_config(write_config(tmp_path, f"database: {url}\n")).database == url


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://gk:s3cret@db.example:5432/gatekeeper",
        "postgres://gk:s3cret@db.example/gatekeeper",
        "postgresql://gk@db.example/gatekeeper?sslmode=require&password=s3cret",
    ],
)
def test_a_database_url_with_a_password_is_refused_without_repeating_it(
    tmp_path: Path, url: str
) -> None:
    [(line, _, path, message)] = problems_of(write_config(tmp_path, f"database: {url}\n"))
    assert (line, path) == (1, "database")
    assert "holds a password" in message and "PGPASSWORD" in message
    assert "s3cret" not in message


def test_daemon_id_and_delivery_lease_are_read_and_default(tmp_path: Path) -> None:
    path = write_config(tmp_path, "daemon_id: gk-eu-1\ndelivery_lease_s: 45\n")
    config = load_config(path)
    assert (config.daemon_id, config.delivery_lease_s) == ("gk-eu-1", 45.0)
    (tmp_path / "plain").mkdir()
    defaults = load_config(write_config(tmp_path / "plain", "listen: 127.0.0.1:8080\n"))
    assert (defaults.daemon_id, defaults.delivery_lease_s) == (None, 30.0)


def test_a_target_timeout_must_fit_in_the_delivery_lease(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """\
        delivery_lease_s: 20
        targets:
          slow:
            url: https://slow.example/hook
            secret_env: SLOW_SECRET
            delivery: {timeout_s: 16}
          fast:
            url: https://fast.example/hook
            secret_env: FAST_SECRET
            delivery: {timeout_s: 15}
        """,
    )
    [(line, _, key, message)] = problems_of(path)
    assert (line, key) == (6, "targets.slow.delivery.timeout_s")
    assert "timeout_s 16 does not leave 5 s of delivery_lease_s (20 s)" in message
    bad_id = write_config(tmp_path, "daemon_id: 'two words'\n")
    [(_, _, key, message)] = problems_of(bad_id)
    assert key == "daemon_id" and "not a valid daemon id" in message
