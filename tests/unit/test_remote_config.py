"""``engine.remote.*``: validated like every other key, settable from the environment."""

from __future__ import annotations

import pytest

from agent.config import load_config
from agent.errors import ConfigError

REMOTE = {"VOXTRAL_RTC_ENGINE__KIND": "remote"}
URL = "http://127.0.0.1:8000/v1"


def test_one_url_or_a_list_from_the_environment() -> None:
    one = load_config(None, {**REMOTE, "VOXTRAL_RTC_ENGINE__REMOTE__BASE_URL": URL})
    assert one.engine.kind == "remote"
    assert one.engine.remote.base_url == (URL,)
    both = load_config(
        None,
        {
            **REMOTE,
            "VOXTRAL_RTC_ENGINE__REMOTE__BASE_URL": f"[{URL}, 'https://gpu-2:8000/v1']",
            "VOXTRAL_RTC_ENGINE__REMOTE__API_KEY": "sk-local",
            "VOXTRAL_RTC_ENGINE__REMOTE__RETRIES": "0",
        },
    )
    assert both.engine.remote.base_url == (URL, "https://gpu-2:8000/v1")
    assert both.engine.remote.api_key == "sk-local"
    assert both.engine.remote.retries == 0


def test_a_whole_section_as_yaml_in_one_variable() -> None:
    cfg = load_config(
        None, {**REMOTE, "VOXTRAL_RTC_ENGINE__REMOTE": f"{{base_url: {URL}, timeout_s: 3}}"}
    )
    assert cfg.engine.remote.base_url == (URL,) and cfg.engine.remote.timeout_s == 3.0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "engine.remote.base_url: must name at least one server"),
        ({"BASE_URL": "127.0.0.1:8000/v1"}, "engine.remote.base_url: must be http(s) URLs"),
        ({"BASE_URL": "http:///v1"}, "engine.remote.base_url: must be http(s) URLs"),
        ({"BASE_URL": f"{URL}?x=1"}, "engine.remote.base_url: must be http(s) URLs"),
        ({"BASE_URL": URL, "TIMEOUT_S": "0"}, "engine.remote.timeout_s: must be in (0, 600]"),
        ({"BASE_URL": URL, "TIMEOUT_S": "soon"}, "engine.remote.timeout_s: must be a number"),
        ({"BASE_URL": URL, "MAX_CONCURRENCY": "0"}, "engine.remote.max_concurrency: must be"),
        ({"BASE_URL": URL, "RETRIES": "11"}, "engine.remote.retries: must be 0..10"),
        ({"BASE_URL": URL, "API_KEY": "two words"}, "engine.remote.api_key: must be printable"),
        ({"BASE_URL": URL, "URL": URL}, "engine.remote.url: unknown key"),
    ],
)
def test_bad_values_name_the_key(env: dict[str, str], message: str) -> None:
    environ = {**REMOTE, **{f"VOXTRAL_RTC_ENGINE__REMOTE__{k}": v for k, v in env.items()}}
    with pytest.raises(ConfigError) as err:
        load_config(None, environ)
    assert message in str(err.value)


def test_urls_are_checked_even_when_another_engine_is_chosen() -> None:
    # A typo waiting in the config would only surface on the day someone switches kind.
    with pytest.raises(ConfigError, match=r"engine\.remote\.base_url"):
        load_config(None, {"VOXTRAL_RTC_ENGINE__REMOTE__BASE_URL": "gpu-1:8000"})
    assert load_config(None, {}).engine.remote.base_url == ()


def test_nested_override_of_a_scalar_names_it() -> None:
    with pytest.raises(ConfigError, match=r"engine\.kind: must be a mapping"):
        load_config(
            None, {"VOXTRAL_RTC_ENGINE__KIND": "remote", "VOXTRAL_RTC_ENGINE__KIND__X": "1"}
        )
