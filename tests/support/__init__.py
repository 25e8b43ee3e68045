"""Test support: real upstream registries, a token server and test images.

Everything runs as real processes on 127.0.0.1 free ports; nothing is mocked.

ports
    ``free_port() -> int``; ``wait_http(url, timeout=15, alive=None)`` polls
    until any HTTP response.

registry  (``/usr/bin/docker-registry``, distribution 2.8.2)
    ``RegistryProcess(tmpdir, auth=None|"htpasswd"|"token",
    users={"alice": "secret"}, token_server=None)``; ``.start()`` /
    ``.stop()`` / context manager; ``.url`` ``http://127.0.0.1:PORT``,
    ``.host`` ``127.0.0.1:PORT``, ``.port``, ``.storage_dir``, ``.log_path``.
    Access log: ``.requests(since=None) -> [Request(method, path, status)]``
    (path includes the query; default: everything after ``start()``),
    ``.mark() -> int`` to pass as ``since``, and
    ``.count(method=None, path_substring="", since=None, status=None)``.

token_server
    ``TokenServer(users={"alice": "secret"}, *, allow_anonymous=False,
    anonymous_actions=("pull",), expires_in=300, issuer="test-issuer",
    service="test-registry", grant=None)``; start/stop/context manager;
    ``.url``, ``.realm`` (``.../token``), ``.cert_pem``, ``.expires_in``
    (mutable), ``.requests: [TokenRequest(user, service, scopes, status,
    granted)]``, ``.tokens_for(user=None)``, ``.issue(subject, access, *,
    audience=None, expires_in=None, issuer=None, not_before=None) -> str``.

client
    ``RegistryClient(url, username=None, password=None, **httpx_kwargs)`` is
    an ``httpx.Client`` (base_url=url) doing Basic or the Bearer token dance
    (scope ``repository:<repo>:pull,push``).  ``.get_manifest(repo, ref,
    accept=MANIFEST_ACCEPT)``, ``.get_blob(repo, digest)``,
    ``.registry_auth.token_fetches``.  Media type constants ``MANIFEST_V2``,
    ``MANIFEST_LIST_V2``, ``OCI_MANIFEST``, ``OCI_INDEX``, ``MANIFEST_ACCEPT``.
    ``read_blob(mirror, repo, blob, headers=None) -> (bytes received, sha256,
    error or None)``: one streamed blob GET whose breakage is reported, not raised.

images
    ``Blob(path, digest, size, media_type, diff_id=None)``;
    ``make_layer(dir, size_bytes, seed=None, media_type=DOCKER_LAYER) -> Blob``;
    ``make_config(dir, diff_ids, os="linux", arch="amd64",
    media_type=DOCKER_CONFIG, variant=None) -> Blob``;
    ``docker_manifest(config, layers)``, ``oci_manifest(config, layers)``,
    ``oci_index([(manifest_bytes, platform)])``,
    ``docker_manifest_list([(manifest_bytes, platform)])`` -> bytes;
    ``push_blob(client, registry_url, repo, blob) -> digest``,
    ``push_manifest(client, registry_url, repo, ref, data, media_type) ->
    digest`` (``registry_url=None`` means the client's base_url);
    ``sha256_bytes``, ``sha256_file``, ``iter_file``.

image_set
    ``build_image_set(dir, registry_client, big_layer_size=100 MiB,
    registry_url=None, seed=1000) -> ImageSet`` with ``.docker``
    (library/alpinetest:v1,alias), ``.oci`` (org/team/app:1.0),
    ``.oci_index`` (multiarch/oci:latest), ``.docker_list``
    (multiarch/docker:latest), ``.big`` (big/image:latest); ``.images``,
    ``.manifests()`` (including list children), ``.blobs() -> [(repo,
    Blob)]``.  Each ``Image`` has repo, tags, manifest (bytes), media_type,
    digest, blobs, children, platform, ``.ref``.

faulty
    ``FaultyUpstream(target_url)``: reverse proxy with ``.arm(fault,
    path_contains="", method=None, times=1, **params) -> Fault`` (``.hits``),
    ``.clear()``, ``.log`` [LogEntry(method, path, status, fault)],
    ``.count(...)``, ``.cdn_url``/``.cdn_log``; faults status, reset, drop,
    corrupt, drip, hang, hang_body, redirect, range_ignored, add_headers.

scripted
    ``Scripted(answer, name="scripted", **uvicorn_options)``: a ServerThread whose every answer is
    ``answer(request) -> Response`` (a plain function of a Starlette Request);
    ``.requests`` records ``Seen(method, path, headers)`` for each request, so
    tests can see what reached it (and with which credentials).

fixtures  (``tests/conftest.py`` star-imports them)
    session: ``upstream`` (open registry), ``htpasswd_upstream``,
    ``token_server``, ``token_upstream``, ``upstream_client``, ``image_set``
    (pushed to ``upstream``; big layer ``MIRROR_TEST_BIG_LAYER_MB``, default
    100); function: ``make_registry(**RegistryProcess kwargs)``,
    ``faulty_upstream`` (``FaultyUpstream(upstream.url)``, started).  Users:
    ``USERS = {"alice": "secret"}``.
"""
