"""Signed bundles: who made a bundle, not only that it arrived whole (sha256 stops a damaged copy; whoever can
write the folder could swap a model and its digest together).

The signature (Ed25519, through the `cryptography` package) covers bundle.json as a whole, thresholds included,
but for the signature itself and what the device builds for itself (the TensorRT engine and its record): every
model file by its sha256 in "files", the input, the preprocessing, the configuration, the calibration. So a
threshold edited after signing (to let defects pass, or by a recalibration on the box) breaks it, and the bundle
must be signed again: `inspect-calibrate BUNDLE --sign KEY`. `--trust PUBKEY` makes inspect-run, -calibrate and
-eval refuse a bundle that is unsigned or signed by another key.

Keys are PEM files: `openssl genpkey -algorithm ed25519 -out line.key` and
`openssl pkey -in line.key -pubout -out line.pub`."""

import base64
import copy
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from edgeinspect.runtime.console import InspectError

ALGORITHM = "ed25519"


def signed_part(record: dict) -> bytes:
    """The bytes a signature covers: bundle.json without its signature and the device's own engine, as canonical
    JSON (sorted keys, no spaces)."""
    part = copy.deepcopy(record)
    part.pop("signature", None)
    engine = part.pop("engine", None)
    if engine and engine.get("file"):
        part.get("files", {}).pop(engine["file"], None)
    return json.dumps(part, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def load_key(path: Path, kind: str, option: str):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise InspectError(f"{option} {path}: unreadable ({error.strerror or error})") from None
    try:
        key = (serialization.load_pem_private_key(data, password=None) if kind == "private"
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as error:
        raise InspectError(f"{option} {path}: not a PEM {kind} key without a passphrase ({error})") from None
    wanted = ed25519.Ed25519PrivateKey if kind == "private" else ed25519.Ed25519PublicKey
    if not isinstance(key, wanted):
        raise InspectError(f"{option} {path}: not an Ed25519 key (openssl genpkey -algorithm ed25519)")
    return key


def key_id(public_key) -> str:
    return hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def _raw(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(record: dict, key_path: Path, option: str = "--sign") -> dict:
    """The signature record for bundle.json's current contents (to store as record["signature"]). It carries the
    public key, so a later change can be noticed where the bundle is saved; trust comes from --trust keys only."""
    key = load_key(key_path, "private", option)
    return {"algorithm": ALGORITHM, "key": key_id(key.public_key()),
            "public_key": base64.b64encode(_raw(key.public_key())).decode(),
            "signed": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "value": base64.b64encode(key.sign(signed_part(record))).decode()}


def still_signed(record: dict) -> bool:
    """Whether the record's signature still matches it (by the key it names): False once anything it covers has
    changed since signing."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ed25519

    signature = record.get("signature") or {}
    try:
        key = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(signature.get("public_key", "")))
        key.verify(base64.b64decode(signature.get("value", "")), signed_part(record))
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def check_trusted(record: dict, record_path: Path, trusted: list[Path]) -> str:
    """One-line InspectError unless bundle.json carries a valid signature by one of the `trusted` public keys;
    returns the key id that signed it."""
    from cryptography.exceptions import InvalidSignature

    keys = {key_id(key): key for key in (load_key(path, "public", "--trust") for path in trusted)}
    signature = record.get("signature")
    if not isinstance(signature, dict) or signature.get("algorithm") != ALGORITHM:
        raise InspectError(f"{record_path}: the bundle is not signed, and --trust asks for a signed one (sign it: "
                           "inspect-calibrate BUNDLE --sign KEY, or inspect-export RUN --sign KEY)")
    key = keys.get(signature.get("key"))
    if key is None:
        raise InspectError(f"{record_path}: signed by key {signature.get('key')}, which is not among the --trust "
                           f"keys ({', '.join(keys)})")
    try:
        key.verify(base64.b64decode(str(signature.get("value", "")), validate=True), signed_part(record))
    except (InvalidSignature, ValueError):
        raise InspectError(f"{record_path}: the signature does not match the bundle: it was changed after signing "
                           "(thresholds, settings or a model); sign it again, or copy the signed bundle") from None
    return signature["key"]
