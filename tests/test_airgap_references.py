"""How ``mirror warm``/``export``/``import`` read image references (airgap/references.py)."""

from __future__ import annotations

import pytest

from mirror.airgap.references import BadReference, full_name, parse, split
from mirror.config import load_config

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text(f"""
data_dir: {tmp_path}/data
upstreams:
  docker.io: {{url: "https://registry-1.docker.io"}}
  ghcr: {{url: "https://ghcr.io"}}
  local: {{url: "http://127.0.0.1:5001"}}
  quay.example: {{url: "http://127.0.0.1:5002"}}
default: docker.io
hosted: {{repositories: ["myorg/*"]}}
""")
    return load_config(path, environ={})


@pytest.mark.parametrize("text,expected", [
    ("alpine:3.19", ("docker.io", "library/alpine", "3.19", None)),
    ("alpine", ("docker.io", "library/alpine", "latest", None)),
    ("docker.io/library/busybox@" + DIGEST, ("docker.io", "library/busybox", None, DIGEST)),
    ("index.docker.io/busybox:1", ("docker.io", "library/busybox", "1", None)),
    ("ghcr.io/org/app:1", ("ghcr", "org/app", "1", None)),
    ("ghcr/org/app:1", ("ghcr", "org/app", "1", None)),
    ("127.0.0.1:5001/org/app:v1@" + DIGEST, ("local", "org/app", "v1", DIGEST)),
    ("myorg/app:1", ("", "myorg/app", "1", None)),
    ("someone/app", ("docker.io", "someone/app", "latest", None)),
])
def test_references_route_as_a_pull_would(config, text, expected):
    ref = parse(text, config)
    assert (ref.upstream, ref.repository, ref.tag, ref.digest) == expected
    assert ref.reference == (expected[3] or expected[2])


@pytest.mark.parametrize("text,why", [
    ("quay.io/org/app:1", "no upstream is configured for registry 'quay.io'"),
    ("alpine:bad tag", "not a valid tag"),
    ("alpine@sha256:abc", "is not a digest"),
    ("Alpine:1", "invalid"),
    (":1", "no repository name"),
])
def test_bad_references_say_why(config, text, why):
    with pytest.raises(BadReference) as info:
        parse(text, config)
    assert why in str(info.value).lower() or why in str(info.value)


def test_full_names_name_the_registry(config):
    assert full_name(config, "docker.io", "library/alpine") == "docker.io/library/alpine"
    assert full_name(config, "ghcr", "org/app") == "ghcr.io/org/app"
    assert full_name(config, "local", "org/app") == "127.0.0.1:5001/org/app"
    assert full_name(config, "", "myorg/app") == "myorg/app"
    # An upstream named like a registry keeps its name whatever URL it is fetched from.
    assert full_name(config, "quay.example", "org/app") == "quay.example/org/app"
    assert parse("quay.example/org/app:1", config).upstream == "quay.example"
    for name in ("docker.io/library/alpine", "ghcr.io/org/app", "127.0.0.1:5001/org/app"):
        ref = parse(name + ":1", config)
        assert full_name(config, ref.upstream, ref.repository) == name


def test_split_keeps_port_colons_out_of_the_tag():
    assert split("127.0.0.1:5001/app") == ("127.0.0.1:5001/app", None, None)
    assert split("127.0.0.1:5001/app:2") == ("127.0.0.1:5001/app", "2", None)
