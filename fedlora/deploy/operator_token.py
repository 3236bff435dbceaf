"""The operator's token: the one credential the SuperLink's Control API accepts."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from flwr.cli.constant import ACCESS_TOKEN_STORE_KEY, AUTHN_TYPE_STORE_KEY, REFRESH_TOKEN_STORE_KEY
from flwr.common.constant import AuthnType
from flwr.supercore.credential_store.file_credential_store import FileCredentialStore

from fedlora.core.errors import ConfigError

__all__ = [
    "DEFAULT_OPERATOR_TOKEN",
    "MIN_TOKEN_LENGTH",
    "OPERATOR_TOKEN",
    "ensure_operator_token",
    "read_operator_token",
    "write_operator_credentials",
]

# The file name `fedlora certs` and `fedlora server` give the token, beside the certificates.
OPERATOR_TOKEN = "operator.token"
MIN_TOKEN_LENGTH = 32
# Where `fedlora server --insecure` keeps it when there is no certificate folder.
DEFAULT_OPERATOR_TOKEN = Path("~/.fedlora") / OPERATOR_TOKEN


def ensure_operator_token(path: Path) -> tuple[Path, bool]:
    """Write a new random operator token to ``path`` (mode 0600) unless one is there.

    Parameters
    ----------
    path : Path
        The token file (``~`` expanded); its folder is made if missing.

    Returns
    -------
    tuple[Path, bool]
        The absolute path, and whether the token was written now.

    """
    path = path.expanduser().resolve()
    if path.exists():
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")  # 256 random bits, 43 characters
    return path, True


def read_operator_token(path: Path) -> str:
    """The operator token in ``path``.

    Parameters
    ----------
    path : Path
        A file written by `ensure_operator_token`.

    Returns
    -------
    str
        The token, without surrounding whitespace.

    Raises
    ------
    ConfigError
        If the file cannot be read, or holds fewer than `MIN_TOKEN_LENGTH` characters.

    """
    try:
        token = path.expanduser().read_text().strip()
    except OSError as err:
        raise ConfigError(f"token-file: cannot read {path}: {err.strerror}") from None
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise ConfigError(f"token-file: {path} must hold one token of at least {MIN_TOKEN_LENGTH} characters")
    return token


def write_operator_credentials(home: Path, address: str, token: str) -> Path:
    """Make the ``flwr`` CLI of ``home`` send ``token`` to the SuperLink at ``address``.

    The ``flwr`` CLI reads its account credentials from ``$FLWR_HOME/credentials.yaml``,
    keyed by the connection's address; for an OIDC account it sends the access token as
    ``Authorization: Bearer`` on every Control API call. The three entries are written with
    Flower's own credential store (which writes the file 0600); fedlora's SuperLink
    (`fedlora.deploy.superlink`) never honours the refresh token.

    Parameters
    ----------
    home : Path
        The Flower home (made 0700 if missing).
    address : str
        The connection's ``host:port``, as in ``config.toml``.
    token : str
        The operator token.

    Returns
    -------
    Path
        The credentials file.

    """
    home = home.expanduser().resolve()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = home / "credentials.yaml"
    store = FileCredentialStore(path)
    store.set(AUTHN_TYPE_STORE_KEY % address, AuthnType.OIDC.encode())
    store.set(ACCESS_TOKEN_STORE_KEY % address, token.encode())
    store.set(REFRESH_TOKEN_STORE_KEY % address, b"unused")
    path.chmod(0o600)
    return path
