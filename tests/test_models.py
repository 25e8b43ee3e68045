"""The request grammar: names, tags, digests, Accept and manifest parsing."""

import json

import pytest

from mirror.errors import DigestInvalid, ManifestInvalid, NameInvalid, TagInvalid
from mirror.models import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    acceptable,
    accepted_types,
    digest_of,
    parse_manifest,
    validate_digest,
    validate_name,
    validate_reference,
    validate_tag,
)

D = "sha256:" + "a" * 64


@pytest.mark.parametrize("name", ["alpine", "library/alpine", "org/team/app", "a.b-c__d/e_f",
                                  "ghcr.io/org/app", "x" * 255])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "Alpine", "../etc", "a//b", "/a", "a/", "a..b", "a/./b",
                                  "-a", "a_", "a b", "a\x00b", "x" * 256, "a/.."])
def test_invalid_names(name):
    with pytest.raises(NameInvalid):
        validate_name(name)


@pytest.mark.parametrize("tag", ["latest", "3.19", "_x", "A-b.c_d", "x" * 128])
def test_valid_tags(tag):
    assert validate_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", ".x", "-x", "x" * 129, "a/b", "a:b", "a b"])
def test_invalid_tags(tag):
    with pytest.raises(TagInvalid):
        validate_tag(tag)


@pytest.mark.parametrize("digest", ["sha256:abc", "sha256:" + "A" * 64, "md5:" + "a" * 32,
                                    "sha256:" + "a" * 63 + "g", "sha512:" + "a" * 64,
                                    ":" + "a" * 64])
def test_invalid_digests(digest):
    with pytest.raises(DigestInvalid):
        validate_digest(digest)
    with pytest.raises(DigestInvalid):
        validate_reference(digest)


def test_valid_digests():
    assert validate_digest(D) == D
    assert validate_digest("sha512:" + "0" * 128)
    empty = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert digest_of(b"") == empty


def test_accept_lines_are_split_and_parameters_dropped():
    lines = [f"{OCI_INDEX}, {DOCKER_LIST};q=0.9", DOCKER_MANIFEST, "garbage type, */*"]
    assert accepted_types(lines) == [OCI_INDEX, DOCKER_LIST, DOCKER_MANIFEST, "*/*"]
    assert acceptable(OCI_MANIFEST, [])
    assert acceptable(OCI_MANIFEST, ["*/*"])
    assert not acceptable(OCI_INDEX, [DOCKER_MANIFEST])


def test_parse_manifest_references():
    image = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
             "config": {"digest": D, "size": 1, "mediaType": "x/y"},
             "layers": [{"digest": "sha256:" + "b" * 64}, {"digest": D}]}
    media_type, refs = parse_manifest(json.dumps(image).encode(), OCI_MANIFEST)
    assert media_type == OCI_MANIFEST
    assert refs.blobs == (D, "sha256:" + "b" * 64) and refs.manifests == ()
    index = {"schemaVersion": 2, "manifests": [{"digest": D}]}
    media_type, refs = parse_manifest(json.dumps(index).encode(), "application/json")
    assert media_type == OCI_INDEX and refs.manifests == (D,)


@pytest.mark.parametrize("body", [b"not json", b"[1]",
                                  json.dumps({"layers": [{"digest": "../x"}]}).encode()])
def test_parse_manifest_rejects(body):
    with pytest.raises(ManifestInvalid):
        parse_manifest(body, OCI_MANIFEST)


def test_sanitize_accept_keeps_lines_and_drops_junk():
    from mirror.models import sanitize_accept
    assert sanitize_accept([f"{OCI_INDEX}, junk, {DOCKER_LIST};q=0.5", "", "a" * 300,
                            DOCKER_MANIFEST]) == [f"{OCI_INDEX}, {DOCKER_LIST};q=0.5",
                                                  DOCKER_MANIFEST]
