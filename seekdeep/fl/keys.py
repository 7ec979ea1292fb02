"""Paillier key custody: the clients share one key pair; the aggregating server gets the
public key only.

One key holder (a client site, or a separate key-holder node) runs ``generate_keypair`` and
hands ``private.json`` to every client over a channel the server does not see; the server is
given ``public.json``. ``load_public_key`` refuses a file holding a private key, so a
misconfigured server fails loudly instead of silently being able to decrypt.

    python -m seekdeep.fl.keys KEY_DIR [--bits 2048]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

from seekdeep.errors import ConfigError
from seekdeep.files import read_json, write_json_atomic

PUBLIC_KIND = "seekdeep-paillier-public"
PRIVATE_KIND = "seekdeep-paillier-private"


def fingerprint(public_key) -> str:
    """Short hash of the modulus: names the key in updates and logs without revealing anything."""
    return hashlib.sha256(str(public_key.n).encode()).hexdigest()[:16]


def generate_keypair(key_dir: str | os.PathLike, key_bits: int = 2048) -> tuple[Path, Path]:
    """Write ``public.json`` and ``private.json`` (mode 0600) into ``key_dir``; returns both paths."""
    from phe import generate_paillier_keypair

    if isinstance(key_bits, bool) or not isinstance(key_bits, int) or key_bits < 512 or key_bits % 8:
        raise ConfigError("key_bits", f"must be a multiple of 8 >= 512 (2048 recommended), got {key_bits!r}")
    public_key, private_key = generate_paillier_keypair(n_length=key_bits)
    key_dir = Path(key_dir)
    key_dir.mkdir(parents=True, exist_ok=True)
    public = key_dir / "public.json"
    private = key_dir / "private.json"
    write_json_atomic(public, {"kind": PUBLIC_KIND, "n": str(public_key.n), "fingerprint": fingerprint(public_key)})
    write_json_atomic(private, {"kind": PRIVATE_KIND, "n": str(public_key.n), "p": str(private_key.p),
                                "q": str(private_key.q), "fingerprint": fingerprint(public_key)})
    os.chmod(private, 0o600)
    return public, private


def public_key_from_n(n: str | int, field: str = "public_key"):
    from phe import PaillierPublicKey

    try:
        value = int(n)
    except (TypeError, ValueError):
        raise ConfigError(field, f"expected the Paillier modulus n as a decimal integer, got {str(n)[:40]!r}") from None
    if value.bit_length() < 512 or value % 2 == 0:
        raise ConfigError(field, f"not a Paillier modulus ({value.bit_length()} bits); accepted: the n of a key "
                          "made by seekdeep.fl.keys.generate_keypair")
    return PaillierPublicKey(value)


def _read(path: str | os.PathLike | None, field: str) -> dict:
    if path is None or str(path) == "":
        raise ConfigError(field, "no key file given; accepted: the public.json / private.json written by "
                          "`python -m seekdeep.fl.keys KEY_DIR`")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, f"{path} does not exist; accepted: the public.json / private.json written by "
                          "`python -m seekdeep.fl.keys KEY_DIR`")
    data = read_json(path)
    if not isinstance(data, dict) or data.get("kind") not in (PUBLIC_KIND, PRIVATE_KIND):
        raise ConfigError(field, f"{path} is not a seekdeep Paillier key file (kind {data.get('kind')!r})"
                          if isinstance(data, dict) else f"{path} is not a key file")
    return data


def load_public_key(path: str | os.PathLike | None, field: str = "public_key"):
    """The public key in ``path``; a file holding a private key is refused (the aggregating
    server must never hold one)."""
    data = _read(path, field)
    if data["kind"] != PUBLIC_KIND or "p" in data or "q" in data:
        raise ConfigError(field, f"{path} holds a private key; the aggregating server takes public.json only")
    return public_key_from_n(data["n"], field)


def load_private_key(path: str | os.PathLike | None, field: str = "private_key"):
    """The private key in ``path`` (clients / the key holder)."""
    from phe import PaillierPrivateKey

    data = _read(path, field)
    if data["kind"] != PRIVATE_KIND:
        raise ConfigError(field, f"{path} holds only a public key; clients need private.json")
    public_key = public_key_from_n(data["n"], field)
    p, q = int(data["p"]), int(data["q"])
    if p * q != public_key.n:
        raise ConfigError(field, f"{path}: p * q does not equal n (a corrupted key file)")
    return PaillierPrivateKey(public_key, p, q)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seekdeep.fl.keys",
                                     description="Generate the clients' shared Paillier key pair.")
    parser.add_argument("key_dir", help="folder for public.json (give it to the server) and private.json "
                        "(give it to every client, never to the server)")
    parser.add_argument("--bits", type=int, default=2048)
    args = parser.parse_args(argv)
    public, private = generate_keypair(args.key_dir, args.bits)
    print(f"public key: {public}\nprivate key: {private} (clients only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
