"""Config parsing: every key validated at start, every problem named; money and periods."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.core.auth import key_digest
from gateway.core.config import DEFAULT_ALIASES, ConfigError, load_settings, parse_settings
from gateway.core.money import MoneyError, cny_to_units, decimal_cny, format_cny
from gateway.core.periods import period_at

HASH = "a" * 64
ENV = {"IMAGE_GATEWAY_UPSTREAM_KEY": "sk_live_abc"}
EXAMPLE = Path(__file__).parent.parent / "config" / "gateway.example.toml"


def parse(data: dict, env: dict | None = None, tmp: Path = Path("/tmp")):
    return parse_settings(data, base_dir=tmp, env=ENV if env is None else env)


def problems(data: dict, env: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        parse(data, env)
    return excinfo.value.problems


MINIMAL = {"teams": {"design": {"keys_sha256": [HASH], "budget_cny": 300.0}}}


def test_minimal_config_and_defaults() -> None:
    settings = parse(MINIMAL)
    (upstream,) = settings.upstreams
    assert (upstream.name, upstream.base_url) == ("default", "https://jp.icodeeasy.cc")
    assert upstream.api_key.reveal() == "sk_live_abc"
    assert upstream.prices == settings.prices
    assert settings.prices == {"low": 1000, "medium": 2000, "high": 4000, "auto": 2000}
    assert settings.teams["design"].budget == 3_000_000
    assert settings.teams["design"].period == "monthly"
    assert settings.database == Path("/tmp/gateway.db")
    assert "sk_live_abc" not in repr(settings)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({**MINIMAL, "server": {"prot": 8080}}, "server.prot is not a known setting"),
        ({**MINIMAL, "server": {"port": "8080"}}, "server.port must be int"),
        ({**MINIMAL, "server": {"port": 70000}}, "server.port must be a port"),
        ({**MINIMAL, "server": {"timezone": "Mars/Olympus"}}, "server.timezone"),
        ({**MINIMAL, "extra": {}}, "extra is not a known setting"),
        ({**MINIMAL, "prices": {"medium": 0.12345}}, "prices.medium"),
        ({**MINIMAL, "prices": {"high": -1}}, "prices.high must not be negative"),
        ({**MINIMAL, "prices": {"ultra": 1.0}}, "prices.ultra is not a known setting"),
        ({**MINIMAL, "upstream": {"base_url": "ftp://x"}}, "upstream.base_url"),
        ({**MINIMAL, "upstream": {"base_url": "https://x/v1"}}, "upstream.base_url"),
        ({**MINIMAL, "upstream": {"timeout_s": 0}}, "upstream.timeout_s"),
        (
            {"teams": {"design": {"keys_sha256": ["ABC"], "budget_cny": 1}}},
            "teams.design.keys_sha256[0]",
        ),
        ({"teams": {"design": {"keys_sha256": [], "budget_cny": 1}}}, "teams.design.keys_sha256"),
        ({"teams": {"design": {"keys_sha256": [HASH]}}}, "teams.design.budget_cny is required"),
        (
            {"teams": {"design": {"keys_sha256": [HASH], "budget_cny": 1, "period": "weekly"}}},
            "teams.design.period",
        ),
        (
            {"teams": {"design": {"keys_sha256": [HASH], "budget_cny": 1, "rpm": 0}}},
            "teams.design.rpm",
        ),
        (
            {"teams": {"design": {"keys_sha256": [HASH], "budget_cny": 1, "budjet": 1}}},
            "teams.design.budjet",
        ),
        ({"teams": {"a b": {"keys_sha256": [HASH], "budget_cny": 1}}}, "teams.a b"),
        (
            {
                "teams": {
                    "a": {"keys_sha256": [HASH], "budget_cny": 1},
                    "b": {"keys_sha256": [HASH], "budget_cny": 1},
                }
            },
            "teams.b.keys_sha256: key hash aaaaaaaaaaaa... is also used by teams.a",
        ),
        ({**MINIMAL, "admin": {"keys_sha256": [HASH]}}, "admin.keys_sha256"),
        ({**MINIMAL, "models": {"aliases": {"dall-e-3": "gpt-4o"}}}, "models.aliases.dall-e-3"),
        ({**MINIMAL, "results": {"store": "s3"}}, "results.store must be directory or off"),
        ({**MINIMAL, "results": {"keep_days": 0}}, "results.keep_days"),
        ({**MINIMAL, "results": {"max_gb": -1}}, "results.max_gb"),
        ({**MINIMAL, "results": {"directory": " "}}, "results.directory"),
        ({**MINIMAL, "results": {"keep": 1}}, "results.keep is not a known setting"),
        (
            {"teams": {"design": {"keys_sha256": [HASH], "budget_cny": 1, "keep_days": -2}}},
            "teams.design.keep_days",
        ),
        (
            {
                "teams": {
                    "design": {"keys_sha256": [HASH], "budget_cny": 1, "reuse_identical_s": "1h"}
                }
            },
            "teams.design.reuse_identical_s must be float",
        ),
    ],
)
def test_problems_name_the_key(data: dict, named: str) -> None:
    found = problems(data)
    assert any(named in problem for problem in found), found


def test_the_result_store_defaults_beside_the_database() -> None:
    settings = parse({**MINIMAL, "storage": {"database": "/var/lib/gw/gateway.db"}})
    results = settings.results
    assert results.directory == Path("/var/lib/gw/results")
    assert (results.keep_days, results.max_bytes) == (7.0, 20 * 1024**3)
    team = parse({"teams": {"design": {"keys_sha256": [HASH], "budget_cny": 1, "keep_days": 2,
                                       "reuse_identical_s": 600}}}).teams["design"]  # fmt: skip
    assert (team.keep_days, team.reuse_identical_s) == (2.0, 600.0)
    assert settings.results.keep_days_of(team) == 2.0
    assert settings.results.keep_days_of(settings.teams["design"]) == 7.0
    assert parse({**MINIMAL, "results": {"store": "off"}}).results.directory is None
    postgres = {**MINIMAL, "storage": {"backend": "postgres", "dsn_env": "DB"}}
    env = {**ENV, "DB": "postgresql://gw@db/gw"}
    assert parse(postgres, env).results.directory == Path("/tmp/results")  # beside the config
    env["STATE_DIRECTORY"] = "/var/lib/image-gateway"
    assert parse(postgres, env).results.directory == Path("/var/lib/image-gateway/results")


def test_missing_central_key() -> None:
    found = problems(MINIMAL, env={})
    assert any("IMAGE_GATEWAY_UPSTREAM_KEY" in p and "missing" in p for p in found)
    assert any(
        "sk_" in p for p in problems(MINIMAL, env={"IMAGE_GATEWAY_UPSTREAM_KEY": "igw_team"})
    )


def test_central_key_from_a_credential_file(tmp_path: Path) -> None:
    (tmp_path / "upstream-key").write_text("sk_from_file\n")
    data = {**MINIMAL, "upstream": {"api_key_file": "${CREDENTIALS_DIRECTORY}/upstream-key"}}
    settings = parse_settings(
        data, base_dir=Path("/"), env={"CREDENTIALS_DIRECTORY": str(tmp_path)}
    )
    assert settings.upstreams[0].api_key.reveal() == "sk_from_file"
    both = {**MINIMAL, "upstream": {"api_key_file": "k", "api_key_env": "X"}}
    assert any("set only one" in p for p in problems(both))


TWO_UPSTREAMS = {
    **MINIMAL,
    "prices": {"high": "0.50"},
    "upstreams": {
        "primary": {"base_url": "https://jp.icodeeasy.cc", "api_key_env": "KEY_A", "weight": 3,
                    "prices": {"high": "0.40"}},
        "backup": {"base_url": "https://other.example", "api_key_env": "KEY_B", "priority": 2,
                   "cooldown_s": 5, "quota_retry_s": 60, "max_fails": 1},
    },
}  # fmt: skip


def test_several_upstreams_each_with_its_key_prices_and_health_settings() -> None:
    settings = parse(TWO_UPSTREAMS, env={"KEY_A": "sk_a", "KEY_B": "sk_b"})
    primary, backup = settings.upstreams
    assert (primary.name, primary.priority, primary.weight) == ("primary", 1, 3)
    assert (backup.name, backup.priority, backup.weight) == ("backup", 2, 1)
    assert (primary.api_key.reveal(), backup.api_key.reveal()) == ("sk_a", "sk_b")
    assert primary.prices == {"low": 1000, "medium": 2000, "high": 4000, "auto": 2000}
    assert backup.prices == {**primary.prices, "high": 5000}  # [prices] where it names none
    assert (primary.cooldown_s, primary.quota_retry_s, primary.max_fails) == (30, 3600, 3)
    assert (backup.cooldown_s, backup.quota_retry_s, backup.max_fails) == (5, 60, 1)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({**TWO_UPSTREAMS, "upstream": {"base_url": "https://x.example"}},
         "upstream and upstreams: use [upstreams.NAME] tables"),
        ({**MINIMAL, "upstreams": {}}, "upstreams must name at least one upstream"),
        ({**MINIMAL, "upstreams": {"b": {"base_url": "https://x.example"}}},
         "upstreams.b: set api_key_env or api_key_file"),
        ({**MINIMAL, "upstreams": {"a b": {"api_key_env": "KEY_A"}}}, "upstreams.a b: upstream names"),
        ({**MINIMAL, "upstreams": {"a": {"api_key_env": "KEY_A", "weight": 0}}},
         "upstreams.a.weight must be at least 1"),
        ({**MINIMAL, "upstreams": {"a": {"api_key_env": "KEY_A", "prices": {"ultra": 1}}}},
         "upstreams.a.prices.ultra is not a known setting"),
        ({**MINIMAL, "upstreams": {"a": {"api_key_env": "KEY_A", "cooldown": 1}}},
         "upstreams.a.cooldown is not a known setting; did you mean cooldown_s?"),
        ({**MINIMAL, "upstreams": {"a": {"api_key_env": "KEY_NONE"}}},
         "upstreams.a.api_key_env (environment variable KEY_NONE): the central key is missing"),
    ],
)  # fmt: skip
def test_upstream_problems_name_the_key(data: dict, named: str) -> None:
    found = problems(data, env={"KEY_A": "sk_a", "KEY_B": "sk_b", **ENV})
    assert any(named in problem for problem in found), found


def test_all_problems_are_reported_together() -> None:
    found = problems(
        {"server": {"port": "x", "bogus": 1}, "teams": {"t": {"budget_cny": "abc"}}}, env={}
    )
    assert len(found) >= 4


def test_example_config_is_valid_once_its_placeholder_is_replaced_and_documents_every_key(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as refused:  # the all-zero placeholder is never a key
        load_settings(EXAMPLE, env=ENV)
    assert len(refused.value.problems) == 1 and "placeholder" in refused.value.problems[0]
    text = EXAMPLE.read_text()
    filled = tmp_path / "gateway.toml"
    filled.write_text(text.replace("0" * 64, HASH))
    settings = load_settings(filled, env=ENV)
    assert settings.teams
    for key in ("host", "port", "timezone", "max_body_mb", "max_image_mb", "drain_s", "backlog", "base_url",
                "api_key_env", "api_key_file", "timeout_s", "connect_timeout_s", "file_hosts",
                "max_attempts", "retry_after_cap_s", "download_max_mb", "download_timeout_s",
                "proxy_results", "database", "access", "prompts", "keys_sha256", "budget_cny", "period",
                "rpm", "max_concurrent", "default_response_format", "poll_cache_ttl_s",
                "settle_interval_s", "settle_max_interval_s", "max_pending_age_s", "keep_hours",
                "retry_dedupe_minutes", "enabled", "require_admin", "aliases", "name", "sha256",
                "expires", "header_timeout_s", "keepalive_timeout_s", "backend", "dsn_env",
                "dsn_file", "instance_lease_s", "priority", "weight", "cooldown_s", "max_fails",
                "quota_retry_s"):  # fmt: skip
        assert f"{key} =" in text or f"# {key} =" in text, key


def test_the_examples_shown_values_are_the_real_defaults(tmp_path: Path) -> None:
    """Issue 20: the example said /var/lib/... was the database's default; it is gateway.db
    beside the config. Its aliases and default_response_format are the defaults too."""
    filled = tmp_path / "gateway.toml"
    filled.write_text(EXAMPLE.read_text().replace("0" * 64, HASH))
    example = load_settings(filled, env=ENV)
    defaults = parse(MINIMAL, tmp=tmp_path)
    assert example.database == defaults.database == tmp_path / "gateway.db"
    assert example.model_aliases == defaults.model_aliases == DEFAULT_ALIASES
    assert 'default_response_format = "auto"' in EXAMPLE.read_text()
    assert defaults.teams["design"].default_response_format == "auto"


@pytest.mark.parametrize("value", ["url", "b64_json", "auto"])
def test_default_response_format_values(value: str) -> None:
    team = {**MINIMAL["teams"]["design"], "default_response_format": value}
    assert parse({"teams": {"design": team}}).teams["design"].default_response_format == value


def test_default_response_format_refuses_others() -> None:
    team = {**MINIMAL["teams"]["design"], "default_response_format": "both"}
    found = problems({"teams": {"design": team}})
    assert any("default_response_format must be url, b64_json or auto" in p for p in found)


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(f'[teams.design]\nkeys_sha256 = ["{HASH}"]\nbudget_cny = 1.5\n')
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[server]\nport = "x"\n[teams.design]\nkeys_sha256 = ["nothex"]\nbudget_cny = 1\n'
    )
    env = {"IMAGE_GATEWAY_UPSTREAM_KEY": "sk_x", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(good)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    fail = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(bad)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
    )
    assert fail.returncode == 1
    assert "server.port" in fail.stderr and "teams.design.keys_sha256[0]" in fail.stderr


def test_new_key_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "new-key"], capture_output=True, text=True, check=True
    )
    key = result.stdout.splitlines()[0]
    assert key.startswith("igw_") and len(key) >= 4 + 22  # >= 128 bits of base64url
    assert f'keys_sha256 = ["{key_digest(key)}"]' in result.stdout


@pytest.mark.parametrize(
    ("value", "units"), [(0.1, 1000), ("0.20", 2000), (300, 3_000_000), (0.0001, 1)]
)
def test_money(value: object, units: int) -> None:
    assert cny_to_units(value) == units


@pytest.mark.parametrize("value", [0.00001, "abc", float("nan"), True, None])
def test_money_refuses(value: object) -> None:
    with pytest.raises(MoneyError):
        cny_to_units(value)


def test_format_cny() -> None:
    assert format_cny(12_3400) == "12.3400 CNY"
    assert format_cny(-5) == "-0.0005 CNY"
    assert decimal_cny(99_8000) == "99.8000" and decimal_cny(-5) == "-0.0005"


def test_periods_in_utc_and_a_zone() -> None:
    now = datetime(2026, 12, 31, 20, 0, tzinfo=UTC)
    monthly = period_at("monthly", now, ZoneInfo("UTC"))
    assert (monthly.key, monthly.end.isoformat()) == (
        "monthly:2026-12",
        "2027-01-01T00:00:00+00:00",
    )
    shanghai = period_at(
        "monthly", now, ZoneInfo("Asia/Shanghai")
    )  # already 2027-01-01 04:00 there
    assert shanghai.key == "monthly:2027-01"
    daily = period_at("daily", now, ZoneInfo("America/New_York"))
    assert daily.key == "daily:2026-12-31"
    assert period_at("total", now, ZoneInfo("UTC")).end is None


def test_unset_variable_in_api_key_file_is_named() -> None:
    data = {**MINIMAL, "upstream": {"api_key_file": "${CREDENTIALS_DIRECTORY}/upstream-key"}}
    found = problems(data, env={})
    assert any("$CREDENTIALS_DIRECTORY, which is not set" in p for p in found), found


def test_reload_keeps_what_needs_a_restart() -> None:
    old = parse(MINIMAL)
    new = parse(
        {
            **MINIMAL,
            "server": {"port": 9999},
            "tasks": {"poll_cache_ttl_s": 9},
            "idempotency": {"keep_hours": 48, "retry_dedupe_minutes": 3},
            "prices": {"high": 0.5},
        }
    )
    merged, kept = old.reloaded(new)
    assert kept == ["server", "tasks", "idempotency.keep_hours"]
    assert (merged.server.port, merged.tasks.poll_cache_ttl_s, merged.idempotency.keep_hours) == (
        8080,
        2.0,
        24.0,
    )
    assert (merged.prices["high"], merged.idempotency.retry_dedupe_minutes) == (5000, 3.0)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (
            {"teams": {"design": {"keys_sha256": [HASH], "budget_cny": 1, "budget": 1}}},
            "teams.design.budget is not a known setting; did you mean budget_cny?",
        ),
        ({**MINIMAL, "server": {"prot": 8080}}, "server.prot is not a known setting; did you mean port?"),
        ({**MINIMAL, "metric": {}}, "metric is not a known setting; did you mean metrics?"),
        ({**MINIMAL, "prices": {"ultra": 1.0}}, "prices.ultra is not a known setting"),
        ({**MINIMAL, "extra": {}}, "extra is not a known setting"),
    ],
)  # fmt: skip
def test_an_unknown_key_suggests_the_known_one_it_is_close_to(data: dict, problem: str) -> None:
    assert problems(data) == [problem]


@pytest.mark.parametrize(
    ("written", "units"),
    [('"300.10"', 3_001_000), ("300.10", 3_001_000), ("300", 3_000_000), ('"0.0001"', 1),
     ('"12345678901234.5678"', 123_456_789_012_345_678)],
)  # fmt: skip
def test_money_in_the_toml_file_is_exact(tmp_path: Path, written: str, units: int) -> None:
    """Strings are read as decimal text, whatever their length; a float through its shortest
    repr, which is the text written for up to 15 significant digits."""
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[prices]\nhigh = {written}\n[teams.design]\nkeys_sha256 = ["{HASH}"]\nbudget_cny = {written}\n'
    )
    settings = load_settings(path, env=ENV)
    assert (settings.teams["design"].budget, settings.prices["high"]) == (units, units)


def test_a_float_of_more_than_15_digits_is_rounded_so_the_example_writes_strings(
    tmp_path: Path,
) -> None:
    """Why config/gateway.example.toml writes money as strings: a TOML float is a double."""
    path = tmp_path / "gateway.toml"
    path.write_text(f'[teams.design]\nkeys_sha256 = ["{HASH}"]\nbudget_cny = 12345678901234.5678\n')
    assert load_settings(path, env=ENV).teams["design"].budget == 123_456_789_012_345_680


# -- audit (issue 21): named admin keys, the instance's name, trusted proxies -----------------

ADMIN_HASH = "b" * 64


def test_admin_keys_named_and_unnamed() -> None:
    settings = parse(
        {
            **MINIMAL,
            "admin": {
                "keys_sha256": [ADMIN_HASH],
                "keys": [{"name": "alice", "sha256": "c" * 64}],
            },
        }
    )
    assert [k.identity for k in settings.all_admin_keys()] == ["sha256:bbbbbbbb", "alice"]
    assert settings.metrics.require_admin  # any admin key makes /metrics need one
    only_named = parse({**MINIMAL, "admin": {"keys": [{"name": "bob", "sha256": "c" * 64}]}})
    assert only_named.metrics.require_admin


@pytest.mark.parametrize(
    ("admin", "problem"),
    [
        ({"keys": [{"name": "Alice", "sha256": ADMIN_HASH}]}, "admin.keys[0].name is required"),
        ({"keys": [{"sha256": ADMIN_HASH}]}, "admin.keys[0].name is required"),
        ({"keys": [{"name": "gateway", "sha256": ADMIN_HASH}]}, "gateway's own resolutions"),
        ({"keys": [{"name": "a", "sha256": "B" * 64}]}, "admin.keys[0].sha256 must be 64"),
        ({"keys": [{"name": "a", "sha256": ADMIN_HASH, "role": "x"}]}, "admin.keys[0].role"),
        (
            {"keys": [{"name": "a", "sha256": ADMIN_HASH}, {"name": "a", "sha256": "c" * 64}]},
            "the name 'a' is used twice",
        ),
        (
            {"keys_sha256": [ADMIN_HASH], "keys": [{"name": "a", "sha256": ADMIN_HASH}]},
            "admin.keys.a: key hash bbbbbbbbbbbb... is also used by admin.keys_sha256",
        ),
        (
            {"keys": [{"name": "a", "sha256": HASH}]},
            "admin.keys.a: key hash aaaaaaaaaaaa... is also used by teams.design.keys_sha256",
        ),
    ],
)
def test_admin_key_problems_are_named(admin: dict, problem: str) -> None:
    found = problems({**MINIMAL, "admin": admin})
    assert any(problem in p for p in found), found


def test_instance_name_and_trusted_proxies() -> None:
    server = parse(
        {**MINIMAL, "server": {"instance_name": "gw-a", "trusted_proxies": ["10.0.0.0/8", "::1"]}}
    ).server
    assert server.instance_name == "gw-a"
    assert [str(n) for n in server.trusted_proxies] == ["10.0.0.0/8", "::1/128"]
    assert parse(MINIMAL).server.trusted_proxies == ()  # nobody is trusted by default
    found = problems(
        {**MINIMAL, "server": {"instance_name": "gw a", "trusted_proxies": ["10.0.0.0/33", 7]}}
    )
    assert any(p.startswith("server.instance_name must be 1-128") for p in found), found
    assert any(p.startswith("server.trusted_proxies[0] must be an IP network") for p in found)
    assert any(p.startswith("server.trusted_proxies[1] must be an IP network") for p in found)


def test_the_console_is_on_by_default_and_its_secret_file_is_checked(tmp_path: Path) -> None:
    settings = parse(MINIMAL)
    assert settings.console.enabled and settings.console.secret is None
    assert not parse({**MINIMAL, "console": {"enabled": False}}).console.enabled
    (tmp_path / "secret").write_text("x" * 40 + "\n")
    shared = parse({**MINIMAL, "console": {"secret_file": "secret"}}, tmp=tmp_path).console
    assert shared.secret is not None and shared.secret.reveal() == "x" * 40
    assert "x" * 40 not in repr(shared)
    (tmp_path / "short").write_text("tooshort")
    for table, named in (
        ({"secret_file": "short"}, "console.secret_file: "),
        ({"secret_file": "missing"}, "console.secret_file: cannot read"),
        ({"secret_file": "${NOPE}/s"}, "console.secret_file uses $NOPE"),
        ({"enabled": "yes"}, "console.enabled must be bool"),
        ({"secret": "x"}, "console.secret is not a known setting; did you mean secret_file?"),
    ):
        with pytest.raises(ConfigError) as excinfo:
            parse({**MINIMAL, "console": table}, tmp=tmp_path)
        assert any(p.startswith(named) for p in excinfo.value.problems), excinfo.value.problems


def test_the_console_settings_need_a_restart() -> None:
    old = parse(MINIMAL)
    merged, kept = old.reloaded(parse({**MINIMAL, "console": {"enabled": False}}))
    assert kept == ["console"] and merged.console.enabled
