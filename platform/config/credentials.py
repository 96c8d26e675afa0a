"""MLflow basic-auth credentials kept out of tracking URIs: moved into this process's environment, where
MLflow reads them, and handed from there to the workers."""

from __future__ import annotations

import os
import re
from urllib.parse import unquote

CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # where MLflow reads basic auth


def move_credentials_to_env(uri: str) -> str:
    """`http://user:secret@host` -> `http://host`, the user and password moved into this process's
    MLFLOW_TRACKING_USERNAME / _PASSWORD (which MLflow sends as basic auth): a secret in a URI would be
    written into params, the config artifact, sweep.json, console lines and Ray's worker logs."""
    # schemes are case-insensitive (RFC 3986): HTTP:// is http://, lower-cased so every later check matches;
    # the userinfo ends at the authority's last '@' (as urllib splits it), so a raw '@' in a password stays in it
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*://)(?:([^/?#]*)@)?(.*)$", uri, re.DOTALL)
    if not match:
        return uri
    scheme, userinfo, rest = match.group(1).lower(), match.group(2), match.group(3)
    if userinfo is None or scheme not in ("http://", "https://"):
        return scheme + uri[len(scheme) :]
    user, _, password = userinfo.partition(":")
    os.environ[CREDENTIAL_ENV[0]] = unquote(user)
    if password:
        os.environ[CREDENTIAL_ENV[1]] = unquote(password)
    return scheme + rest


def tracking_credentials() -> dict[str, str]:
    """The credentials `move_credentials_to_env` moved into this process's environment, for a worker to set
    in its own (handed over in the pickled payload: Ray logs a runtime env's variables in plain text)."""
    return {k: os.environ[k] for k in CREDENTIAL_ENV if k in os.environ}
