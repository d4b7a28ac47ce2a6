#!/usr/bin/env python3
"""Recomputes the keys of SPEC.md §5.3, the frames of §10 (protocol 2) and those of appendix A
(protocol 1) with an independent implementation.

ChaCha20-Poly1305 comes from the `cryptography` package (pip install cryptography); HChaCha20
(the key schedule, and protocol 1's salted XChaCha20-Poly1305 frames) is written out below and
checked against the test vector of draft-irtf-cfrg-xchacha §2.2.1.
Every expected value is also looked up in SPEC.md's `hex` blocks, so this file and the spec
cannot drift apart. `cargo xtask test` runs it (step "protocol cross-check").
Run: python3 protocol/tests/crosscheck.py
"""
import os
import re
import struct
import sys

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305


def h(s):
    return bytes.fromhex(s)


def rotl(v, c):
    return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))


def quarter(s, a, b, c, d):
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] = rotl(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] = rotl(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] = rotl(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] = rotl(s[b] ^ s[c], 7)


def hchacha20(key, inp):
    s = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574]
    s += list(struct.unpack("<8I", key)) + list(struct.unpack("<4I", inp))
    for _ in range(10):
        quarter(s, 0, 4, 8, 12); quarter(s, 1, 5, 9, 13)
        quarter(s, 2, 6, 10, 14); quarter(s, 3, 7, 11, 15)
        quarter(s, 0, 5, 10, 15); quarter(s, 1, 6, 11, 12)
        quarter(s, 2, 7, 8, 13); quarter(s, 3, 4, 9, 14)
    return struct.pack("<8I", *(s[0:4] + s[12:16]))


def xseal(key, xnonce, plaintext, aad):
    sub = hchacha20(key, xnonce[:16])
    return ChaCha20Poly1305(sub).encrypt(b"\0" * 4 + xnonce[16:], plaintext, aad)


def nonce(boot, direction, counter):
    return struct.pack("<IB", boot, direction) + counter.to_bytes(7, "little")


KEY = bytes(range(32))
BOOT, HELLO_COUNTER = 7, 5
SALT = h("a0a1a2a3a4a5a6a7")
aead = ChaCha20Poly1305(KEY)
failures = 0


SPEC = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "SPEC.md")).read()
SPEC_HEX = ["".join(b.split()) for b in re.findall(r"```hex\n(.*?)```", SPEC, re.S)]


def check(name, got, want, in_spec=True):
    global failures
    ok = got == want
    if in_spec and not any(want.hex() in block for block in SPEC_HEX):
        print("FAIL", name, "expected value not in any hex block of SPEC.md")
        ok = False
    failures += not ok
    print(("ok  " if ok else "FAIL"), name, got.hex(" "))


check("hchacha20 draft vector",
      hchacha20(KEY, h("000000090000004a0000000031415927")),
      h("82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"), in_spec=False)

hello_hdr = h("435201011800000005000000")
hello_body = h("8202078280040132")
check("A v1 hello tag", aead.encrypt(nonce(BOOT, 0, 5), b"", hello_hdr + hello_body),
      h("317b4d77737c8d4ed485d8d0f11871f4"))

check("A v1 ping", aead.encrypt(nonce(BOOT, 0, 6), h("effdb6f50d"), h("435201071500000006000000")),
      h("2e1d731614b44be5e1daeb4580153f9fc06302b90c"))

check("A v1 ack", aead.encrypt(nonce(BOOT, 1, HELLO_COUNTER << 24), h("024000"),
                               h("435201041300000000000000")),
      h("4e0bdfb3f4627161820affd94e649f119a41ad"))


def xnonce(index):
    return SALT + struct.pack("<II", BOOT, HELLO_COUNTER) + b"\x01" + index.to_bytes(7, "little")


check("A v1 salted welcome", xseal(KEY, xnonce(0), h("ac020040"), h("435201021c00020000000000") + SALT),
      h("945cba83060fb2f3deed30e52284514f542bde06"))
check("A v1 salted ack", xseal(KEY, xnonce(1), h("024000"), h("435201041300000001000000")),
      h("baaad8e3f4ca5954649f99129c94a2e6ed45bc"))


# Protocol 2 (SPEC.md §5.3, §10)
def n2(counter):
    return struct.pack("<I", counter) + b"\0" * 8


def header(kind, body_len, counter):
    return bytes([0x43, 0x52, 2, kind]) + struct.pack("<H", body_len + 16) + b"\0\0" + struct.pack("<I", counter)


device_nonce = bytes(range(0xB0, 0xBC)) + struct.pack("<I", 5)
challenge = bytes(range(0xC0, 0xCC))
root = hchacha20(KEY, b"cairn protocol 2")
conn = hchacha20(root, device_nonce)
hello_key = hchacha20(conn, b"\0" * 12 + b"hllo")
d2g = hchacha20(conn, challenge + b"d2gw")
g2d = hchacha20(conn, challenge + b"gw2d")
check("5.3 root", root, h("e3ea7be274491e35e43111875750a188abecdaa94f6d7bc754323442f6f52d10"))
check("5.3 conn", conn, h("8f91c5189875f2df4b858b6d222c9d48a8e9d597cc6f01678f78439be42286b4"))
check("5.3 hello", hello_key, h("163f17e0d06a9f020d0664a222300c02dd762075d1a603725f5b326f8eba90d6"))
check("5.3 d2g", d2g, h("53d4ba9cc1a8be3bbe105696b00cd63c7ccd029b82f3a391bb31622fd45c9e2f"))
check("5.3 g2d", g2d, h("88df283a6e333f7fcc48b9b81abf91bdd4132c7e022ed7102ed12bebfaa23772"))
check("5.3 same boot, other boot nonce",
      hchacha20(root, bytes(range(0xD0, 0xDC)) + struct.pack("<I", 5)),
      h("a50a053f6bf79c5c911a080d014a2180997ab91a5a198da22fa759d13a56df3c"))

hello_body = h("8202078280040232") + device_nonce
hdr = header(1, len(hello_body), 0)
check("10.1 hello", hdr + hello_body + ChaCha20Poly1305(hello_key).encrypt(n2(0), b"", hdr + hello_body),
      h("4352020128000000000000008202078280040232b0b1b2b3b4b5b6b7b8b9babb05000000"
        "3cf1b029fbb1d4efd0216c84e4b4555a"))
hdr = header(2, 12 + 4, 0)
check("10.2 welcome", hdr + challenge + ChaCha20Poly1305(g2d).encrypt(n2(0), h("ac020040"), hdr + challenge),
      h("435202022000000000000000c0c1c2c3c4c5c6c7c8c9cacb87ceaf36d78e089b852e860695c71718974ec333"))
hdr = header(7, 5, 1)
check("10.3 ping", hdr + ChaCha20Poly1305(d2g).encrypt(n2(1), h("effdb6f50d"), hdr),
      h("43520207150000000100000046f8e3ef31567060f6155d0629473250975ad331f6"))
hdr = header(4, 3, 1)
check("10.4 ack", hdr + ChaCha20Poly1305(g2d).encrypt(n2(1), h("024000"), hdr),
      h("4352020413000000010000001a4d70261fee91bfde607407ae6dd60df2909a"))

sys.exit(1 if failures else 0)
