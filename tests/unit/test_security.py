"""Bearer tokens and CORS origins: the policy object and its configuration checks."""

from __future__ import annotations

import pytest

from agent.config import ServerConfig, load_config
from agent.errors import ConfigError
from signaling.security import Security

TOKEN = "s3cret-token-0123456789"


def test_bearer_token_must_match_one_of_the_tokens() -> None:
    sec = Security(ServerConfig(auth_tokens=(TOKEN, "another-token-abcdefgh")))
    assert sec.auth_required
    assert sec.token_ok(f"Bearer {TOKEN}")
    assert sec.token_ok(f"bearer   {TOKEN}  ")
    assert sec.token_ok("Bearer another-token-abcdefgh")
    for bad in (None, "", TOKEN, f"Basic {TOKEN}", "Bearer ", f"Bearer {TOKEN}x", "Bearer s3"):
        assert not sec.token_ok(bad), bad
    assert not Security(ServerConfig()).auth_required


def test_cors_allow_list() -> None:
    sec = Security(ServerConfig(cors_origins=("https://app.example.com",)))
    assert sec.allowed_origin("https://app.example.com") == "https://app.example.com"
    assert sec.allowed_origin("https://evil.example.com") is None
    assert sec.allowed_origin(None) is None
    anyone = Security(ServerConfig(cors_origins=("*",)))
    assert anyone.allowed_origin("https://evil.example.com") == "*"
    assert Security(ServerConfig()).allowed_origin("https://app.example.com") is None


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"VOXTRAL_RTC_SERVER__AUTH_TOKENS": "[short]"}, "server.auth_tokens"),
        ({"VOXTRAL_RTC_SERVER__AUTH_TOKENS": "['has a space in it here']"}, "server.auth_tokens"),
        ({"VOXTRAL_RTC_SERVER__CORS_ORIGINS": "[https://x.example/path]"}, "server.cors_origins"),
        ({"VOXTRAL_RTC_SERVER__CORS_ORIGINS": "[example.com]"}, "server.cors_origins"),
        ({"VOXTRAL_RTC_SERVER__SHUTDOWN_GRACE_S": "-1"}, "server.shutdown_grace_s"),
        ({"VOXTRAL_RTC_ENGINE__WATCHDOG_S": "0"}, "engine.watchdog_s"),
        ({"VOXTRAL_RTC_LIMITS__OFFERS_PER_MINUTE_PER_IP": "-1"}, "limits.offers_per_minute_per_ip"),
        ({"VOXTRAL_RTC_LIMITS__MAX_CALL_S": "0.5"}, "limits.max_call_s"),
        ({"VOXTRAL_RTC_LIMITS__CHANNEL_BUFFER_BYTES": "10"}, "limits.channel_buffer_bytes"),
    ],
)
def test_bad_values_name_their_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, env)


def test_tokens_and_origins_from_the_environment() -> None:
    cfg = load_config(
        None,
        {
            "VOXTRAL_RTC_SERVER__AUTH_TOKENS": f"{TOKEN},another-token-abcdefgh",
            "VOXTRAL_RTC_SERVER__CORS_ORIGINS": "[http://localhost:3000, '*']",
        },
    )
    assert cfg.server.auth_tokens == (TOKEN, "another-token-abcdefgh")
    assert cfg.server.cors_origins == ("http://localhost:3000", "*")
