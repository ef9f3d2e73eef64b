"""The Lambda's Socrata app token: from the environment, a Secrets Manager secret or an SSM
parameter, read once per container. A secret or parameter that is named but holds no token is
an error naming it, never a run without the token (Socrata then throttles, and nothing would
say why); what it holds is never quoted."""

from __future__ import annotations

import os

import orjson

from .errors import UsageError
from .socrata.setup import check_app_token

_token_cache: dict[str, str | None] = {}
_TOKEN_KEYS = ("app_token", "token", "SOCRATA_APP_TOKEN")
_STORED_AS = 'expected the bare token, or JSON with it as "app_token" or as its only member'


def app_token() -> str | None:
    """The Socrata app token: from the environment, Secrets Manager or SSM (cached). A secret or
    parameter that is named but holds no token is an error: a run without the token would go on
    throttled, and nothing would say why."""
    if "token" in _token_cache:
        return _token_cache["token"]
    token = os.environ.get("SOCRATA_APP_TOKEN", "").strip() or None
    secret = os.environ.get("SOCRATA_APP_TOKEN_SECRET")
    parameter = os.environ.get("SOCRATA_APP_TOKEN_PARAMETER")
    if token is None and secret:
        import boto3

        value = boto3.client("secretsmanager").get_secret_value(SecretId=secret)["SecretString"]
        token = _checked(_token_in_secret(value), f"the secret {secret}", _STORED_AS)
    elif token is None and parameter:
        import boto3

        got = boto3.client("ssm").get_parameter(Name=parameter, WithDecryption=True)
        where = f"the SSM parameter {parameter}"
        token = _checked(got["Parameter"]["Value"], where, "expected the bare token")
    _token_cache["token"] = token
    return token


def _token_in_secret(value: str) -> str:
    """The text a secret holds for the token: the bare token, or JSON with it under one of
    `_TOKEN_KEYS` or as its only member (the console's key/value form, under a key of the
    operator's)."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        doc = value  # the bare token (or JSON that does not parse: `_checked` says so)
    if isinstance(doc, int | float) and not isinstance(doc, bool):
        doc = value  # a bare token of digits
    if isinstance(doc, dict):
        known = [doc[k] for k in _TOKEN_KEYS if isinstance(doc.get(k), str) and doc[k].strip()]
        only = list(doc.values()) if len(doc) == 1 else []
        doc = known[0] if known else only[0] if only else None
    return doc if isinstance(doc, str) else ""


def _checked(text: str, where: str, expected: str) -> str:
    """`text` as the token, or an error naming `where` (never quoting what it holds: an
    operator may have put the token in a key's place)."""
    if not text.strip():
        raise UsageError(f"{where} holds no app token: {expected}")
    try:
        return check_app_token(text) or ""
    except UsageError:  # JSON that does not parse (a pasted dict, a trailing comma), or worse
        raise UsageError(f"{where} holds text no app token is made of: {expected}") from None
