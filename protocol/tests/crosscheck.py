#!/usr/bin/env python3
"""Recomputes the sealed frames of SPEC.md §10 with an independent implementation.

ChaCha20-Poly1305 comes from the `cryptography` package; HChaCha20 (for the salted
XChaCha20-Poly1305 frames) is written out below and checked against the test vector of
draft-irtf-cfrg-xchacha §2.2.1. Run: python3 protocol/tests/crosscheck.py
"""
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


def check(name, got, want):
    global failures
    ok = got == want
    failures += not ok
    print(("ok  " if ok else "FAIL"), name, got.hex(" "))


check("hchacha20 draft vector",
      hchacha20(KEY, h("000000090000004a0000000031415927")),
      h("82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"))

hello_hdr = h("435201011800000005000000")
hello_body = h("8202078280040132")
check("10.1 hello tag", aead.encrypt(nonce(BOOT, 0, 5), b"", hello_hdr + hello_body),
      h("317b4d77737c8d4ed485d8d0f11871f4"))

check("10.2 ping", aead.encrypt(nonce(BOOT, 0, 6), h("effdb6f50d"), h("435201071500000006000000")),
      h("2e1d731614b44be5e1daeb4580153f9fc06302b90c"))

check("10.3 ack", aead.encrypt(nonce(BOOT, 1, HELLO_COUNTER << 24), h("024000"),
                               h("435201041300000000000000")),
      h("4e0bdfb3f4627161820affd94e649f119a41ad"))


def xnonce(index):
    return SALT + struct.pack("<II", BOOT, HELLO_COUNTER) + b"\x01" + index.to_bytes(7, "little")


check("10.4 salted welcome", xseal(KEY, xnonce(0), h("ac020040"), h("435201021c00020000000000") + SALT),
      h("945cba83060fb2f3deed30e52284514f542bde06"))
check("10.4 salted ack", xseal(KEY, xnonce(1), h("024000"), h("435201041300000001000000")),
      h("baaad8e3f4ca5954649f99129c94a2e6ed45bc"))

sys.exit(1 if failures else 0)
