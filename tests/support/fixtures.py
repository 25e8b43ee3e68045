"""pytest fixtures for real upstream registries (``from tests.support.fixtures import *``)."""

from __future__ import annotations

import os

import pytest

from .client import RegistryClient
from .image_set import ImageSet, build_image_set
from .registry import RegistryProcess
from .token_server import TokenServer

__all__ = [
    "USERS", "upstream", "htpasswd_upstream", "token_server", "token_upstream",
    "image_set", "upstream_client", "make_registry", "make_mirror", "faulty_upstream",
    "as_root", "accelerator", "accelerator_images", "faulty_accelerator",
]

USERS = {"alice": "secret"}


def big_layer_size() -> int:
    return int(float(os.environ.get("MIRROR_TEST_BIG_LAYER_MB", "100")) * 1024 * 1024)


@pytest.fixture(scope="session")
def upstream(tmp_path_factory) -> RegistryProcess:
    """Open (no auth) registry; ``image_set`` is pushed here."""
    with RegistryProcess(tmp_path_factory.mktemp("upstream")) as registry:
        yield registry


@pytest.fixture(scope="session")
def htpasswd_upstream(tmp_path_factory) -> RegistryProcess:
    """Registry with Basic auth for ``USERS`` (alice/secret); empty."""
    with RegistryProcess(tmp_path_factory.mktemp("htpasswd-upstream"),
                         auth="htpasswd", users=USERS) as registry:
        yield registry


@pytest.fixture(scope="session")
def token_server() -> TokenServer:
    """Token server for ``USERS``; anonymous requests are refused."""
    with TokenServer(users=USERS) as server:
        yield server


@pytest.fixture(scope="session")
def token_upstream(tmp_path_factory, token_server) -> RegistryProcess:
    """Registry using ``token_server`` for auth; empty."""
    with RegistryProcess(tmp_path_factory.mktemp("token-upstream"),
                         auth="token", token_server=token_server) as registry:
        yield registry


@pytest.fixture(scope="session")
def upstream_client(upstream) -> RegistryClient:
    with RegistryClient(upstream.url) as client:
        yield client


@pytest.fixture(scope="session")
def image_set(tmp_path_factory, upstream, upstream_client) -> ImageSet:
    """The standard images (see ``tests.support.image_set``) pushed to ``upstream``.

    Big layer size: ``MIRROR_TEST_BIG_LAYER_MB`` (default 100).
    """
    return build_image_set(tmp_path_factory.mktemp("images"), upstream_client,
                           big_layer_size=big_layer_size())


@pytest.fixture(scope="session")
def accelerator(tmp_path_factory) -> RegistryProcess:
    """A second open registry playing an accelerator (a daocloud-style copy of the
    upstream); ``accelerator_images`` pushes the same images as ``image_set`` to it."""
    with RegistryProcess(tmp_path_factory.mktemp("accelerator")) as registry:
        yield registry


@pytest.fixture(scope="session")
def accelerator_images(tmp_path_factory, accelerator, image_set) -> ImageSet:
    """``image_set`` again, byte for byte (same seed and sizes), in ``accelerator``."""
    with RegistryClient(accelerator.url) as client:
        copy = build_image_set(tmp_path_factory.mktemp("accelerator-images"), client,
                               big_layer_size=big_layer_size())
    assert [i.digest for i in copy.images] == [i.digest for i in image_set.images]
    return copy


@pytest.fixture
def faulty_accelerator(accelerator, accelerator_images):
    """``FaultyUpstream(accelerator.url)`` for one test (see ``tests.support.faulty``)."""
    from .faulty import FaultyUpstream

    with FaultyUpstream(accelerator.url) as proxy:
        yield proxy


@pytest.fixture
def make_registry(tmp_path_factory):
    """Factory for extra registries stopped at test end:
    ``make_registry(auth=None, users=None, token_server=None) -> RegistryProcess``."""
    started = []

    def make(**kwargs) -> RegistryProcess:
        registry = RegistryProcess(tmp_path_factory.mktemp("registry"), **kwargs).start()
        started.append(registry)
        return registry

    yield make
    for registry in started:
        registry.stop()


@pytest.fixture
def make_mirror(tmp_path_factory):
    """Factory for mirror processes stopped at test end:
    ``make_mirror(config_dict, env=None) -> MirrorProcess`` (started)."""
    from .mirror import MirrorProcess

    started = []

    def make(config: dict, env: dict | None = None) -> MirrorProcess:
        mirror = MirrorProcess(tmp_path_factory.mktemp("mirror"), config, env).start()
        started.append(mirror)
        return mirror

    yield make
    for mirror in started:
        mirror.stop()


@pytest.fixture
def faulty_upstream(upstream):
    """``FaultyUpstream(upstream.url)`` (see ``tests.support.faulty``), started
    for one test and stopped after it (which also aborts anything hanging)."""
    from .faulty import FaultyUpstream

    with FaultyUpstream(upstream.url) as proxy:
        yield proxy


@pytest.fixture
def as_root():
    """podman, containerd and dockerd run here as root (own storage, no systemd)."""
    if os.geteuid() != 0:
        pytest.fail("podman, containerd and dockerd are run as root here (own storage, no "
                    "systemd); run the test suite as root")
