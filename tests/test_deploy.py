"""The ways to run the mirror as a service: the Dockerfile, deploy/mirror.service,
deploy/compose.yml and deploy/k8s.yml, and the README that explains them.

No Docker engine or systemd runs here, so the Dockerfile and the manifests are parsed
and checked against each other and against the code (the port, the data directory,
the uid, the probes); the systemd unit goes through ``systemd-analyze verify`` and its
command line and environment start a real mirror process, as does the compose file's
TLS-and-logins config.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import httpx
import pytest
import yaml

from mirror.config import Config, load_config
from tests.support.ports import free_port, stop_process, wait_http

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


# -- the Dockerfile, as instructions -------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def args_of(name: str) -> list[str]:
    return [rest for word, rest in dockerfile() if word == name]


def only(name: str) -> str:
    found = args_of(name)
    assert len(found) == 1, f"expected one {name} in the Dockerfile, found {found}"
    return found[0]


def exec_form(text: str) -> list[str]:
    value = yaml.safe_load(text)   # a JSON array is YAML
    assert isinstance(value, list), f"expected the exec form [\"...\"], got {text}"
    return value


def labels() -> dict[str, str]:
    found: dict[str, str] = {}
    for text in args_of("LABEL"):
        for item in shlex.split(text):
            key, _, value = item.partition("=")
            found[key] = value
    return found


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for text in args_of("ENV"):
        for item in shlex.split(text):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def image_uid() -> int:
    user = only("USER")
    uid = user.split(":")[0]
    assert uid.isdigit(), f"USER {user}: numeric, so runAsNonRoot can check it"
    return int(uid)


def image_volume() -> str:
    volume = only("VOLUME")
    return exec_form(volume)[0] if volume.startswith("[") else volume


def image_port() -> int:
    return int(only("EXPOSE").split("/")[0])


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dockerfile_has_oci_labels_with_the_package_version():
    found = labels()
    for key in ("title", "description", "version", "revision", "created", "source"):
        assert f"org.opencontainers.image.{key}" in found, key
    version_arg = [a for a in args_of("ARG") if a.startswith("VERSION=")]
    assert version_arg == [f"VERSION={pyproject()['project']['version']}"]
    assert found["org.opencontainers.image.version"] == "${VERSION}"


def test_dockerfile_health_check_is_mirror_healthcheck():
    """`mirror healthcheck` reads $MIRROR_CONFIG as `serve` does, so the check follows
    the configured port and TLS instead of a hard-coded http://127.0.0.1:5000."""
    check = only("HEALTHCHECK")
    options, _, command = check.partition(" CMD ")
    assert "5000" not in check and "http" not in check
    assert exec_form(command) == ["mirror", "healthcheck"]
    assert re.search(r"--timeout=\d+s", options)
    assert exec_form(only("ENTRYPOINT")) == ["mirror"]
    assert exec_form(only("CMD")) == ["serve"]


def test_dockerfile_config_path_port_volume_and_user_agree_with_its_config():
    env = image_env()
    assert env["MIRROR_CONFIG"] == "/etc/mirror/config.yml"
    copies = [shlex.split(a) for a in args_of("COPY")]
    assert ["deploy/config.yml", "/etc/mirror/config.yml"] in copies
    config = load_config(DEPLOY / "config.yml")
    assert image_port() == Config().port == config.port
    assert config.host == "0.0.0.0"
    assert image_volume() == str(config.data_dir) == "/var/lib/mirror"
    uid = image_uid()
    assert uid != 0
    setup = " ".join(args_of("RUN"))
    assert re.search(rf"useradd [^&]*--uid {uid}\b", setup)
    assert re.search(rf"chown {uid}(:{uid})? {config.data_dir}\b", setup)
    # after USER, the working directory is the data directory, not the source
    workdirs = [rest for word, rest in dockerfile() if word == "WORKDIR"]
    assert workdirs[-1] == str(config.data_dir)


def test_image_config_is_the_embedded_default_with_its_data_dir():
    config = load_config(DEPLOY / "config.yml")
    assert config == dataclasses.replace(load_config(None), data_dir=Path("/var/lib/mirror"))


def test_dockerfile_installs_dependencies_before_copying_the_source():
    steps = dockerfile()
    copy_project = next(i for i, (w, a) in enumerate(steps)
                        if w == "COPY" and shlex.split(a)[0] == "pyproject.toml")
    copy_source = next(i for i, (w, a) in enumerate(steps)
                       if w == "COPY" and shlex.split(a)[0] in ("mirror", "mirror/", "."))
    assert shlex.split(steps[copy_project][1])[:-1] == ["pyproject.toml"], \
        "the dependency layer must depend on pyproject.toml alone"
    deps = [a for w, a in steps[copy_project:copy_source] if w == "RUN" and "pip install" in a]
    assert len(deps) == 1, "one RUN between the two COPYs installs the dependencies"
    after = [a for w, a in steps[copy_source:] if w == "RUN" and "pip install" in a]
    assert after and all("--no-deps" in a for a in after)

    # The dependency RUN extracts the list from pyproject.toml: run that same command
    # here and compare with what pip would install for the package.
    words = shlex.split(deps[0])
    code = words[words.index("-c") + 1]
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    assert out.split("\n")[:-1] == project["dependencies"] + extras["s3"] + extras["postgres"]


def test_dockerignore_keeps_out_the_data_and_keeps_in_what_is_copied():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        parts = PurePosixPath(path).parts
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatch(p, pat.removeprefix("**/")) or fnmatch.fnmatch(p, pat)
                   for pat in patterns for p in prefixes)

    for text in args_of("COPY"):
        for source in shlex.split(text)[:-1]:
            assert not ignored(source), source
            assert (ROOT / source).exists(), source
    for path in ("data/index.db", ".git/HEAD", "tests/test_deploy.py",
                 "deploy/etc/certs/server.key", "deploy/etc/auth/htpasswd",
                 "mirror/__pycache__/x.pyc"):
        assert ignored(path), path


# -- deploy/mirror.service -----------------------------------------------------------------

UNIT = DEPLOY / "mirror.service"


def unit_entries(text: str | None = None) -> list[tuple[str, str, str]]:
    """(section, key, value) in order; keys may repeat, as systemd allows."""
    entries, section = [], ""
    for line in (UNIT.read_text() if text is None else text).splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def service(key: str) -> list[str]:
    return [v for s, k, v in unit_entries() if s == "Service" and k == key]


def unit_environment() -> dict[str, str]:
    env = {}
    for value in service("Environment"):
        for item in shlex.split(value):
            name, _, val = item.partition("=")
            env[name] = val
    return env


def exec_start() -> list[str]:
    (command,) = service("ExecStart")
    return shlex.split(command.lstrip("-@:+!"))


def test_unit_runs_as_its_own_user_in_its_state_directory_hardened():
    (user,) = service("User")
    assert user not in ("", "root", "0", "nobody")
    assert service("DynamicUser") in ([], ["no"])
    sysusers = (DEPLOY / "mirror.sysusers").read_text()
    assert re.search(rf"^u {user} ", sysusers, re.M), "deploy/mirror.sysusers makes the user"
    (state,) = service("StateDirectory")
    argv = exec_start()
    assert argv[argv.index("--data-dir") + 1] == f"/var/lib/{state}"
    assert unit_environment()["MIRROR_CONFIG"] == "/etc/mirror/config.yml"
    assert argv[:2] == ["/opt/mirror/bin/mirror", "serve"]
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes",
                       "ProtectHome": "yes", "PrivateTmp": "yes",
                       "CapabilityBoundingSet": ""}.items():
        assert service(key) == [value], key
    assert service("ExecReload") == ["/bin/kill -HUP $MAINPID"]


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``systemd-analyze verify`` on the unit with ExecStart pointing at this Python."""
    unit_dir = tmp_path / "units"
    unit_dir.mkdir(exist_ok=True)
    path = unit_dir / "mirror.service"
    path.write_text(unit_text.replace("/opt/mirror/bin/mirror", f"{sys.executable} -m mirror"))
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze "
                    "(Debian package systemd; scripts/test installs it)")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    """systemd is not PID 1 here, so the unit is checked rather than started. verify
    fails on a missing binary and warns on unknown keys and bad values: both count."""
    text = UNIT.read_text()
    result = verify(text, tmp_path)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "mirror.service" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
    # ...and this check notices a broken unit:
    broken = verify(text.replace("ProtectSystem=strict", "ProtectSystem=strickt"), tmp_path)
    assert "mirror.service" in broken.stdout + broken.stderr


def test_unit_exec_start_and_environment_start_the_mirror(tmp_path):
    """The unit's own command line and Environment= run a real server: only the
    install path, the state directory and the listen address are this machine's."""
    state = tmp_path / "state"
    state.mkdir()
    etc = tmp_path / "etc"
    etc.mkdir()
    port = free_port()
    config_text = (DEPLOY / "config.yml").read_text()
    assert "listen: 0.0.0.0:5000\n" in config_text
    (etc / "config.yml").write_text(config_text.replace("listen: 0.0.0.0:5000",
                                                        f"listen: 127.0.0.1:{port}"))
    env = {k: v.replace("/etc/mirror", str(etc)) for k, v in unit_environment().items()}
    argv = exec_start()
    argv = [sys.executable, "-m", "mirror"] + [
        str(state) if a.startswith("/var/lib/") else a for a in argv[1:]]
    log = tmp_path / "mirror.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env={**os.environ, **env}, cwd="/", stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=20,
                  alive=lambda: proc.poll() is None)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        assert (state / "index.db").is_file(), "the cache is in the state directory"
    except Exception:
        print(log.read_text())
        raise
    finally:
        stop_process(proc)
    # systemd counts exit 0 and death by SIGTERM as clean (no Restart=on-failure)
    assert proc.returncode in (0, -signal.SIGTERM), proc.returncode


# -- deploy/compose.yml --------------------------------------------------------------------

def compose_service() -> dict:
    compose = yaml.safe_load((DEPLOY / "compose.yml").read_text())
    (name,) = compose["services"]
    return compose, compose["services"][name]


def k8s_docs() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s.yml").read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one object of each kind"
    return by_kind


def test_compose_agrees_with_the_dockerfile():
    compose, svc = compose_service()
    assert (DEPLOY / svc["build"] / "Dockerfile").resolve() == ROOT / "Dockerfile"
    version = pyproject()["project"]["version"]
    assert svc["image"] == f"mirror:{version}"
    assert [p.split(":")[-1] for p in svc["ports"]] == [str(image_port())]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
    assert mounts[image_volume()] in compose["volumes"], "the data is on a named volume"
    config_dir = str(PurePosixPath(image_env()["MIRROR_CONFIG"]).parent)
    assert svc["environment"]["MIRROR_CONFIG"] == image_env()["MIRROR_CONFIG"]
    host_config = DEPLOY / mounts[config_dir]
    raw = yaml.safe_load((host_config / "config.yml").read_text())
    assert raw["tls"] and raw["auth"], "the compose mirror serves TLS and asks for logins"
    assert raw["listen"].rsplit(":", 1)[1] == str(image_port())
    assert raw["data_dir"] == image_volume()
    assert "healthcheck" not in svc or svc["healthcheck"]["test"][1:] == ["mirror",
                                                                          "healthcheck"]


def test_compose_config_serves_tls_and_logins(tmp_path):
    """deploy/etc/config.yml with a certificate and a user made as the README says:
    the mirror starts, answers HTTPS and asks for a login."""
    etc = tmp_path / "etc"
    shutil.copytree(DEPLOY / "etc", etc, ignore=shutil.ignore_patterns("certs", "auth"))
    port = free_port()
    text = (etc / "config.yml").read_text()
    (etc / "config.yml").write_text(text.replace("listen: 0.0.0.0:5000",
                                                 f"listen: 127.0.0.1:{port}")
                                    .replace("data_dir: /var/lib/mirror",
                                             f"data_dir: {tmp_path / 'data'}"))
    mirror = [sys.executable, "-m", "mirror"]
    subprocess.run(mirror + ["certs", "127.0.0.1", "--out", str(etc / "certs")], check=True,
                   capture_output=True)
    subprocess.run(mirror + ["htpasswd", "add", "alice", "--file", str(etc / "auth/htpasswd")],
                   input="secret\n", text=True, check=True, capture_output=True)
    env = {**os.environ, "MIRROR_CONFIG": str(etc / "config.yml")}
    log = tmp_path / "mirror.log"
    with open(log, "wb") as out:
        # cwd: the config's folder, as relative paths resolve from there
        proc = subprocess.Popen(mirror + ["serve"], env=env, cwd="/", stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        ca = ssl.create_default_context(cafile=etc / "certs" / "ca.crt")
        wait_http(f"https://127.0.0.1:{port}/healthz", timeout=20, verify=ca,
                  alive=lambda: proc.poll() is None)
        assert httpx.get(f"https://127.0.0.1:{port}/healthz", verify=ca).status_code == 200
        probe = httpx.get(f"https://127.0.0.1:{port}/v2/", verify=ca)
        assert probe.status_code == 401
        assert probe.headers["www-authenticate"].startswith("Bearer ")
    except Exception:
        print(log.read_text())
        raise
    finally:
        stop_process(proc)


# -- deploy/k8s.yml ------------------------------------------------------------------------

def test_k8s_manifest_agrees_with_the_dockerfile():
    docs = k8s_docs()
    deployment, service_, claim, config_map = (docs["Deployment"], docs["Service"],
                                               docs["PersistentVolumeClaim"],
                                               docs["ConfigMap"])
    spec = deployment["spec"]
    assert spec["replicas"] == 1, "one server per data directory"
    assert spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"][
        "labels"].items()
    assert service_["spec"]["selector"].items() <= spec["template"]["metadata"][
        "labels"].items()
    uid = image_uid()
    assert pod["securityContext"]["runAsUser"] == uid
    assert pod["securityContext"]["fsGroup"] == uid
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    _, compose_svc = compose_service()
    assert container["image"] == compose_svc["image"]
    (port,) = container["ports"]
    assert port["containerPort"] == image_port()
    (svc_port,) = service_["spec"]["ports"]
    assert svc_port["targetPort"] in (port["name"], port["containerPort"])

    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MIRROR_CONFIG"] == image_env()["MIRROR_CONFIG"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    data = mounts[image_volume()]
    assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    config_volume = mounts[str(PurePosixPath(env["MIRROR_CONFIG"]).parent)]
    assert config_volume["configMap"]["name"] == config_map["metadata"]["name"]
    config_text = config_map["data"][PurePosixPath(env["MIRROR_CONFIG"]).name]
    config = load_config_text(config_text)
    assert config.port == port["containerPort"]
    assert str(config.data_dir) == image_volume()

    scheme = "HTTPS" if config.tls else "HTTP"
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in (port["name"], port["containerPort"])
        assert get.get("scheme", "HTTP") == scheme


def load_config_text(text: str) -> Config:
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        f.write(text)
        f.flush()
        return load_config(f.name)


# -- README --------------------------------------------------------------------------------

def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.M | re.S)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def test_readme_runs_it_as_a_service_three_ways():
    section = readme_section("Run it as a service")
    for name in ("deploy/mirror.service", "deploy/compose.yml", "deploy/k8s.yml",
                 "systemctl", "docker compose", "kubectl apply"):
        assert name in section, name
    uid = str(image_uid())
    assert f"chown -R {uid}:{uid}" in section, "says which uid the image runs as, and the fix"


def test_readme_troubleshooting_has_the_five_common_errors():
    section = readme_section("Troubleshooting")
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert lines[1].startswith("|---"), "a table"
    rows = lines[2:]
    assert len(rows) >= 5
    wanted = ["server gave HTTP response to HTTPS client", "x509", "401", "503", "429"]
    for needle in wanted:
        matching = [row for row in rows if needle in row.split("|")[1]]
        assert len(matching) == 1, needle
        fix = matching[0].split("|")[2]
        assert len(fix) > 80, f"{needle}: say what to do"
    for link in ("#use-it-from-your-clients", "#tls-and-logins"):
        assert link in section
