#!/usr/bin/env python3
"""Generate the benchmark's "app" tree: a seeded stand-in for a `dotnet publish` output.

    gen_app.py OUT_DIR [--seed N] [--scale F]

About 80 MB in about 2,000 files (scale 1.0), with the mix that matters for compression:
- DLL-like binaries (~62%): a pool of byte "instruction" tokens reused with a skewed
  distribution, string tables and random runs; gzip -6 shrinks them ~2.5x, like real IL.
- JSON / XML / text metadata (~13%): config, ui layouts, texts, schemas, deps.json; ~6x.
- images and fonts (~25%): random bytes, incompressible, like PNG/JPEG/WOFF2.

The same seed gives the same bytes, so every machine benchmarks the same tree.
"""

import argparse
import os
import random

WORDS = (
    "app altinn service data model task layout page component input label text "
    "required validation process gateway form submit confirm receipt party org person "
    "address city postcode country email phone amount currency date period start end "
    "true false null id name value type schema options source binding readonly hidden "
    "nb nn en title description help summary group repeating table row column"
).split()


def log_sizes(rng, n, total, sigma):
    """n sizes from a log-normal, scaled to sum to about `total`."""
    raw = [rng.lognormvariate(0.0, sigma) for _ in range(n)]
    k = total / sum(raw)
    return [max(64, int(r * k)) for r in raw]


class Binary:
    """DLL-like content: skewed reuse of a token pool plus strings and random runs."""

    def __init__(self, rng):
        self.rng = rng
        self.tokens = [rng.randbytes(rng.randint(4, 48)) for _ in range(4096)]
        # Zipf-ish weights: a few opcodes sequences are very common.
        self.weights = [1.0 / (i + 1) ** 1.1 for i in range(len(self.tokens))]
        self.cum = []
        acc = 0.0
        for w in self.weights:
            acc += w
            self.cum.append(acc)

    def make(self, size):
        rng = self.rng
        out = bytearray(b"MZ\x90\x00" + bytes(60) + b"PE\x00\x00")
        while len(out) < size:
            r = rng.random()
            if r < 0.80:
                out += b"".join(rng.choices(self.tokens, cum_weights=self.cum, k=64))
            elif r < 0.95:
                words = rng.choices(WORDS, k=24)
                out += (".".join(w.capitalize() for w in words)).encode("utf-16-le")
            else:
                out += rng.randbytes(rng.randint(256, 2048))
        return bytes(out[:size])


def json_text(rng, size):
    parts = ["{\n"]
    n = 0
    while n < size:
        key = rng.choice(WORDS) + rng.choice(WORDS).capitalize()
        kind = rng.random()
        if kind < 0.4:
            val = '"' + " ".join(rng.choices(WORDS, k=rng.randint(1, 8))) + '"'
        elif kind < 0.7:
            val = str(rng.randint(0, 100000))
        else:
            val = '{ "id": "%s-%d", "required": %s, "dataModelBindings": { "simpleBinding": "%s.%s" } }' % (
                rng.choice(WORDS), rng.randint(0, 999), rng.choice(["true", "false"]),
                rng.choice(WORDS), rng.choice(WORDS))
        line = '  "%s": %s,\n' % (key, val)
        parts.append(line)
        n += len(line)
    parts.append('  "end": true\n}\n')
    return "".join(parts).encode()[: max(size, 16)]


def xml_text(rng, size):
    parts = ['<?xml version="1.0" encoding="utf-8"?>\n<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">\n']
    n = 0
    while n < size:
        name = rng.choice(WORDS).capitalize() + rng.choice(WORDS).capitalize()
        line = '  <xs:element name="%s" type="xs:%s" minOccurs="%d" maxOccurs="%d" />\n' % (
            name, rng.choice(["string", "decimal", "date", "boolean"]), rng.randint(0, 1), rng.randint(1, 9))
        parts.append(line)
        n += len(line)
    parts.append("</xs:schema>\n")
    return "".join(parts).encode()


def write(root, rel, data):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    mb = 1_000_000
    s = a.scale

    binary = Binary(rng)
    n_dll = int(420 * s) or 1
    for i, size in enumerate(log_sizes(rng, n_dll, 45 * mb * s, 1.2)):
        ns = ".".join(rng.choices(WORDS, k=rng.randint(1, 3))).title()
        name = "Microsoft.%s.%d.dll" % (ns, i) if i % 3 else "Altinn.%s.%d.dll" % (ns, i)
        sub = "" if i % 9 else "runtimes/linux-x64/lib/net8.0/"
        write(a.out, sub + name, binary.make(size))
    write(a.out, "Altinn.Application.dll", binary.make(900_000))
    for i, size in enumerate(log_sizes(rng, int(40 * s) or 1, 5 * mb * s, 0.8)):
        write(a.out, "Altinn.App.%d.pdb" % i, binary.make(size))

    n_text = int(1380 * s) or 1
    dirs = ["config/texts", "ui/form/layouts", "ui/confirm/layouts", "models", "options",
            "config/authorization", "config/process", "wwwroot/js", "wwwroot/css", "", "localization"]
    for i, size in enumerate(log_sizes(rng, n_text, 9 * mb * s, 1.0)):
        d = dirs[i % len(dirs)]
        if i % 5 == 0:
            write(a.out, os.path.join(d, "schema%d.xsd" % i), xml_text(rng, size))
        else:
            write(a.out, os.path.join(d, "%s%d.json" % (rng.choice(WORDS), i)), json_text(rng, size))
    write(a.out, "Altinn.Application.deps.json", json_text(rng, 400_000))
    write(a.out, "Altinn.Application.runtimeconfig.json", json_text(rng, 600))
    write(a.out, "appsettings.json", json_text(rng, 2_000))

    n_img = int(180 * s) or 1
    for i, size in enumerate(log_sizes(rng, n_img, 18 * mb * s, 1.1)):
        ext = ["png", "jpg", "woff2", "svgz"][i % 4]
        write(a.out, "wwwroot/img/asset%d.%s" % (i, ext), rng.randbytes(size))


if __name__ == "__main__":
    main()
