#!/usr/bin/python3
"""Validate an OCI image layout against the OCI image-spec JSON schemas.

Usage: validate_oci.py LAYOUT_DIR [SCHEMA_DIR]

The schemas come from Debian's golang-github-opencontainers-image-spec-dev package (installed
by .ci/run); validation uses Debian's python3-jsonschema. Every index, manifest and config
reachable from index.json is checked, and every blob's digest and size are compared with its
descriptor. Exits non-zero with one line per problem.
"""
import hashlib
import json
import os
import sys

import jsonschema

DEFAULT_SCHEMAS = "/usr/share/gocode/src/github.com/opencontainers/image-spec/schema"


def load_schemas(d):
    store = {}
    by_file = {}
    for name in os.listdir(d):
        if name.endswith(".json"):
            with open(os.path.join(d, name)) as f:
                s = json.load(f)
            by_file[name] = s
            if "id" in s:
                store[s["id"]] = s
            store["file://" + os.path.join(d, name)] = s
            # Schemas refer to each other by file name relative to their ids.
            store["https://opencontainers.org/schema/image/" + name] = s
            store["https://opencontainers.org/schema/" + name] = s
    return store, by_file


class LocalResolver(jsonschema.RefResolver):
    """Resolve every schema reference from the local schema directory, by file name; never
    from the network."""

    by_file = {}

    def resolve_remote(self, uri):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if name in self.by_file:
            return self.by_file[name]
        raise jsonschema.RefResolutionError(f"schema {uri} is not in the local schema directory")


def main():
    layout = sys.argv[1]
    schema_dir = sys.argv[2] if len(sys.argv) > 2 else DEFAULT_SCHEMAS
    store, by_file = load_schemas(schema_dir)
    LocalResolver.by_file = by_file
    problems = []

    def validate(doc, schema_file, what):
        schema = by_file[schema_file]
        resolver = LocalResolver(
            base_uri="file://" + os.path.join(schema_dir, schema_file), referrer=schema, store=store
        )
        v = jsonschema.Draft4Validator(schema, resolver=resolver)
        for e in v.iter_errors(doc):
            problems.append(f"{what}: {e.message} at {list(e.absolute_path)}")

    def blob(desc):
        alg, hexd = desc["digest"].split(":", 1)
        path = os.path.join(layout, "blobs", alg, hexd)
        with open(path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != hexd:
            problems.append(f"blob {desc['digest']}: content does not match its digest")
        if len(data) != desc["size"]:
            problems.append(f"blob {desc['digest']}: size {len(data)} != descriptor {desc['size']}")
        return data

    with open(os.path.join(layout, "oci-layout")) as f:
        validate(json.load(f), "image-layout-schema.json", "oci-layout")
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    validate(index, "image-index-schema.json", "index.json")
    checked = 0

    def walk(desc):
        nonlocal checked
        doc = json.loads(blob(desc))
        mt = desc["mediaType"]
        if mt == "application/vnd.oci.image.index.v1+json":
            validate(doc, "image-index-schema.json", desc["digest"])
            for d in doc.get("manifests", []):
                walk(d)
        elif mt == "application/vnd.oci.image.manifest.v1+json":
            validate(doc, "image-manifest-schema.json", desc["digest"])
            config = json.loads(blob(doc["config"]))
            validate(config, "config-schema.json", doc["config"]["digest"])
            if len(config["rootfs"]["diff_ids"]) != len(doc["layers"]):
                problems.append(f"{desc['digest']}: diff_ids and layers differ in number")
            for layer in doc["layers"]:
                blob(layer)
            checked += 1
        else:
            problems.append(f"{desc['digest']}: unexpected media type {mt}")

    for d in index.get("manifests", []):
        walk(d)
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print(f"ok: {checked} image(s) valid")


if __name__ == "__main__":
    main()
