"""Which authentication a Ray job API asks for, and whether the token this machine holds is accepted.

    python3 cluster/check_token.py http://127.0.0.1:8265

Used by cluster/submit.sh before `ray job submit` (standard library only: it runs with any Python 3, wherever the
`ray` CLI is installed). Prints `token` or `disabled`, the mode the job API runs in, for the caller to set
RAY_AUTH_MODE to, and exits 0. Otherwise prints one line to stderr saying what is wrong and where the token is
expected, and exits 2: a job API that does not answer, a cluster that asks for a token when none is found, a token
the cluster rejects. The token itself is never printed.

Where the token is looked for, in Ray's own order (https://docs.ray.io/en/latest/ray-security/token-auth.html):
RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_TOKEN_FILE = "~/.ray/auth_token"
WHERE = (f"put the cluster's token in {DEFAULT_TOKEN_FILE} (mode 600), or name a file that holds it in "
         f"RAY_AUTH_TOKEN_PATH, or set RAY_AUTH_TOKEN (KubeRay: the auth_token key of the Secret named by "
         f"authOptions.secretName, loft-dist-ray-auth in cluster/*.yaml)")


class TokenError(Exception):
    """One line for the user."""


def find_token() -> tuple[str | None, str]:
    """(token or None, where it came from / was looked for), in Ray's order of precedence."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise TokenError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read a token there ({e.strerror or e}); "
                             f"{WHERE}") from e
        if not token:
            raise TokenError(f"RAY_AUTH_TOKEN_PATH={path} is empty; {WHERE}")
        return token, f"RAY_AUTH_TOKEN_PATH={path}"
    default = Path(DEFAULT_TOKEN_FILE).expanduser()
    try:
        token = default.read_text().strip()
    except OSError:
        token = ""
    return (token or None), str(default)


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def check(address: str) -> str:
    """The job API's authentication mode ("token" or "disabled"), after checking that this machine's token fits."""
    address = address.rstrip("/")
    try:
        status, body = _get(f"{address}/api/authentication_mode")  # public: answers without a token
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise TokenError(f"no Ray job API answers at {address} ({reason}); start the head, or port-forward its "
                         f"dashboard port (kubectl port-forward svc/<cluster>-head-svc 8265:8265), and set "
                         f"RAY_ADDRESS to it") from e
    if status == 404:
        return "disabled"  # a Ray older than 2.52, without token authentication
    mode = json.loads(body).get("authentication_mode", "disabled") if status == 200 else "disabled"
    if mode != "token":
        return "disabled"
    token, where = find_token()
    if token is None:
        raise TokenError(f"the Ray cluster at {address} uses token authentication and no token was found "
                         f"(RAY_AUTH_TOKEN and RAY_AUTH_TOKEN_PATH unset, no {where}); {WHERE}")
    status, _ = _get(f"{address}/api/version", token)
    if status in (401, 403):
        raise TokenError(f"the Ray cluster at {address} rejected the token from {where} (HTTP {status}): it is "
                         f"not this cluster's token; {WHERE}")
    return "token"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: check_token.py RAY_JOB_API_ADDRESS", file=sys.stderr)
        return 2
    try:
        print(check(argv[0]))
    except TokenError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
