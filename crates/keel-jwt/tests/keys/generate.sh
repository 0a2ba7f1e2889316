#!/bin/sh
# Regenerates the test keys and their public JWKs. The keys are fixtures, committed once so
# tests are reproducible; they protect nothing. Needs openssl and python3.
set -eu
cd "$(dirname "$0")"

for name in rsa-1 rsa-2; do
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$name.pem"
done
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ec-1.pem
openssl genpkey -algorithm ed25519 -out ed-1.pem
for name in rsa-1 rsa-2 ec-1 ed-1; do
    openssl pkey -in "$name.pem" -pubout -out "$name.pub.pem"
    openssl pkey -in "$name.pem" -pubout -outform DER -out "$name.pub.der"
done

# Public JWKs, derived with openssl (not with the library under test).
python3 - <<'PY'
import base64, json, subprocess

def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

def der(name: str) -> bytes:
    return open(f"{name}.pub.der", "rb").read()

for name in ["rsa-1", "rsa-2"]:
    out = subprocess.check_output(["openssl", "pkey", "-pubin", "-in", f"{name}.pub.pem", "-noout", "-text"]).decode()
    modulus = subprocess.check_output(["openssl", "rsa", "-pubin", "-in", f"{name}.pub.pem", "-noout", "-modulus"]).decode().strip().split("=", 1)[1]
    assert "Exponent: 65537" in out
    n = bytes.fromhex(modulus).lstrip(b"\x00")
    jwk = {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": name, "n": b64u(n), "e": b64u((65537).to_bytes(3, "big"))}
    json.dump(jwk, open(f"{name}.jwk.json", "w"), indent=2)

point = der("ec-1")[-65:]
assert point[0] == 4
jwk = {"kty": "EC", "use": "sig", "alg": "ES256", "kid": "ec-1", "crv": "P-256", "x": b64u(point[1:33]), "y": b64u(point[33:])}
json.dump(jwk, open("ec-1.jwk.json", "w"), indent=2)

jwk = {"kty": "OKP", "use": "sig", "alg": "EdDSA", "kid": "ed-1", "crv": "Ed25519", "x": b64u(der("ed-1")[-32:])}
json.dump(jwk, open("ed-1.jwk.json", "w"), indent=2)
PY
