"""What counts as a secret, and how secrets are kept out of everything a run writes or prints.

One rule for names, used for config keys, MLflow params and environment variables alike:
a name is split into words (at `.`, `_`, `-`, digits and camelCase humps) and is secret
when a word is a credential word (password, secret, token, credential, ...) or a pair
names a key (api key, access key, private key). Whole words, so `tokens`, `max_tokens`,
`train_tokens` and `tokenizer.*` are not secrets while `HF_TOKEN` and `apiKey` are; a
vocabulary token (`eos_token`, `pad_token`) is not a credential either.

Values are redacted three ways: by the name of their key, by being (or containing) the
value of a secret-named environment variable (a config may interpolate one with
`${oc.env:...}`), and by the credentials of a URL (`scheme://user:***@host`, and
secret-named query parameters such as `?password=...`).

A sweep's command line loses its secrets before Hydra sees it: each becomes an
`${oc.env:NAME}` reference to a variable holding it (overrides_without_secrets), since
Hydra copies the overrides into files and log lines that grow cannot mask.
"""
from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from typing import Any, Mapping

REDACTED = "***"
# Shorter environment values are not treated as secrets: replacing a 3-letter value inside
# paths and names would mangle them, and real credentials are longer.
MIN_SECRET_LEN = 6

_CREDENTIAL_WORDS = {"password", "passwd", "passphrase", "secret", "secrets", "token", "credential",
                     "credentials", "apikey", "pat"}
_KEY_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("auth", "key")}
# `<word>_token` where the word makes it a vocabulary token, not a credential
_VOCAB_TOKENS = {"eos", "bos", "pad", "unk", "sep", "cls", "mask", "special", "start", "end"}
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+")

URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@\s:]*):(?P<password>[^/@\s]+)@")
# a value ends at a quote too: a URL quoted inside a command line (an sbatch script's)
_QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&;#\s]+)=(?P<value>[^&;#\s'\"]*)")
# `${oc.env:NAME}` or a shell's `${NAME}`: a reference to a secret, not one (kept where it
# stands for a password)
_REFERENCE = re.compile(r"\$\{(?:oc\.env:)?[^}]*\}")


def name_words(name: str) -> list[str]:
    """`MLFLOW_TRACKING_PASSWORD` -> [mlflow, tracking, password]; `apiKey` -> [api, key]."""
    return [w.lower() for w in _WORD.findall(name)]


def is_secret_name(name: str) -> bool:
    words = name_words(str(name))
    for i, w in enumerate(words):
        if w == "token" and i and words[i - 1] in _VOCAB_TOKENS:
            continue
        if w in _CREDENTIAL_WORDS:
            return True
        if i and (words[i - 1], w) in _KEY_PAIRS:
            return True
    return False


def secret_values(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """value -> variable name, for environment variables whose name is secret."""
    environ = os.environ if environ is None else environ
    return {value: name for name, value in environ.items()
            if is_secret_name(name) and len(value) >= MIN_SECRET_LEN}


def redact_url(text: str) -> str:
    """Credentials in the URLs of `text`: `user:password@` -> `user:***@`, and the values
    of secret-named query parameters (`?password=x` -> `?password=***`)."""
    text = URL_USERINFO.sub(lambda m: m[0] if _REFERENCE.fullmatch(m["password"])
                            else f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    if "://" in text:
        text = _QUERY_PARAM.sub(lambda m: f"{m['sep']}{m['name']}={REDACTED}" if is_secret_name(m["name"])
                                and m["value"] and not _REFERENCE.fullmatch(m["value"]) else m[0], text)
    return text


def redact_text(text: str, secrets: Mapping[str, str] | None = None) -> str:
    """A string to print or write: URL credentials and secret environment values masked."""
    secrets = secret_values() if secrets is None else secrets
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return redact_url(text)


def redact_config(obj: Any, secrets: Mapping[str, str] | None = None, _key: str = "") -> Any:
    """A copy of a config (nested dicts and lists, e.g. `dataclasses.asdict(cfg)` or flat
    MLflow params) safe to write: values of secret-named keys become `***`, strings lose
    URL credentials and secret environment values. Everything else is unchanged, so the
    copy still compares equal to another redacted copy of the same config."""
    secrets = secret_values() if secrets is None else secrets
    if _key and is_secret_name(_key) and obj not in (None, "", {}, []):
        return REDACTED
    if isinstance(obj, Mapping):
        return {k: redact_config(v, secrets, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_config(v, secrets, _key) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj


# A sweep's own secrets move into the environment under these names (see overrides_without_secrets)
SECRET_VARIABLE = "GROW_SECRET_{}"


def _variable_for(value: str, environ: dict) -> str:
    """The environment variable that holds `value`: one already secret-named that does, else
    the first GROW_SECRET_<n> free (or holding it), set now. Numbered in order of
    appearance, never by a hash of the value (a short hash of a weak password reveals it)."""
    for name, held in environ.items():
        if held == value and is_secret_name(name):
            return name
    n = 1
    while environ.get(SECRET_VARIABLE.format(n), value) != value:
        n += 1
    name = SECRET_VARIABLE.format(n)
    environ[name] = value
    return name


def _hide(value: str, secrets: Mapping[str, str], environ: dict) -> str:
    """`value` with its secrets as `${oc.env:NAME}` references: values of secret environment
    variables, then passwords in URLs and values of secret-named URL query parameters (by
    position: a short password is not replaced elsewhere in the value)."""
    def ref(secret: str) -> str:
        return "${oc.env:" + _variable_for(secret, environ) + "}"

    for secret in sorted((v for v in secrets if v in value), key=len, reverse=True):
        value = value.replace(secret, ref(secret))

    def userinfo(m) -> str:
        hidden = m["password"] if _REFERENCE.fullmatch(m["password"]) else ref(m["password"])
        return f"{m['scheme']}{m['user']}:{hidden}@"

    def query(m) -> str:
        if not is_secret_name(m["name"]) or not m["value"] or _REFERENCE.fullmatch(m["value"]):
            return m[0]
        return f"{m['sep']}{m['name']}={ref(m['value'])}"

    value = URL_USERINFO.sub(userinfo, value)
    return _QUERY_PARAM.sub(query, value) if "://" in value else value


def overrides_without_secrets(args: list[str], environ: dict | None = None) -> list[str]:
    """A command line whose overrides hold no secret: each one becomes a reference to an
    environment variable holding it (`tracking.uri=http://u:${oc.env:GROW_SECRET_1}@host`).

    Hydra copies a sweep's overrides, as typed, into files and lines grow does not write
    (multirun.yaml, each member's .hydra/, its launch lines, a Slurm launcher's pickles);
    a reference is safe in all of them, and every member resolves it to the real value from
    the environment it inherits (sbatch exports it to Slurm jobs too)."""
    environ = os.environ if environ is None else environ
    secrets = secret_values(environ)
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and not arg.startswith("-"):
            value = _hide(value, secrets, environ)
        out.append(key + eq + value)
    return out


class MaskedStream:
    """A text stream (stdout, stderr) that masks secrets in everything written to it: the
    last line of defence for what grow prints itself, what Hydra logs and what MLflow prints."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):  # flush, isatty, fileno, encoding, ...
        return getattr(self._stream, name)


@contextmanager
def masked_output():
    """sys.stdout and sys.stderr masked for the duration (a `grow` command)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = MaskedStream(sys.stdout), MaskedStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
