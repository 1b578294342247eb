#!/usr/bin/env python3
"""Independent COSE check of Fleetcast manifests, with pycose and cbor2.

  cose_interop.py verify ENVELOPE_FILE PUBLIC_KEY_PEM...
      Decodes a Fleetcast signed-manifest envelope [manifest, [COSE_Sign1...]],
      verifies every detached COSE_Sign1 over the manifest bytes with pycose,
      and checks the manifest is deterministic CBOR. Prints one line per
      signature; exits 1 if any signature fails.

  cose_interop.py sign ALG OUT_MESSAGE OUT_PUBLIC_PEM PAYLOAD_FILE
      Makes a fresh key (ALG = EdDSA or ES256), signs PAYLOAD with pycose as an
      attached COSE_Sign1, writes the message and the public key PEM.
"""
import sys

import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pycose.algorithms import EdDSA, Es256
from pycose.headers import KID, Algorithm
from pycose.keys import CoseKey
from pycose.messages import Sign1Message


def verify(envelope_path, key_paths):
    with open(envelope_path, "rb") as f:
        envelope = cbor2.loads(f.read())
    manifest, signatures = envelope
    # The manifest must be deterministic CBOR: re-encoding canonically changes nothing.
    assert cbor2.dumps(cbor2.loads(manifest), canonical=True) == manifest, "manifest is not deterministic CBOR"
    keys = []
    for path in key_paths:
        with open(path, "rb") as f:
            keys.append(CoseKey.from_pem_public_key(f.read().decode()))
    failures = 0
    for sig in signatures:
        raw = cbor2.dumps(sig)
        message = Sign1Message.decode(raw)
        assert message.payload is None, "signature is expected detached"
        message.payload = manifest
        ok = False
        for key in keys:
            message.key = key
            try:
                if message.verify_signature():
                    ok = True
                    break
            except Exception:
                continue
        alg = message.phdr.get(Algorithm)
        kid = message.phdr.get(KID, b"").hex()
        print(f"signature kid={kid} alg={getattr(alg, 'fullname', alg)}: {'valid' if ok else 'INVALID'}")
        failures += 0 if ok else 1
    return 1 if failures else 0


def sign(alg, out_message, out_public, payload_path):
    with open(payload_path, "rb") as f:
        payload = f.read()
    if alg == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
        algorithm = EdDSA
    else:
        private = ec.generate_private_key(ec.SECP256R1())
        algorithm = Es256
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key = CoseKey.from_pem_private_key(pem.decode())
    message = Sign1Message(phdr={Algorithm: algorithm}, uhdr={KID: b"python"}, payload=payload)
    message.key = key
    with open(out_message, "wb") as f:
        f.write(message.encode(tag=True))
    with open(out_public, "wb") as f:
        f.write(private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "verify":
        sys.exit(verify(sys.argv[2], sys.argv[3:]))
    if len(sys.argv) == 6 and sys.argv[1] == "sign":
        sys.exit(sign(*sys.argv[2:]))
    print(__doc__)
    sys.exit(2)
