# mirror: a pull-through caching registry. README "Run it as a service" has more.
#   docker build -t mirror:0.1.0 .
#   docker run -d -p 5000:5000 -v mirror-data:/var/lib/mirror mirror:0.1.0
# The config is /etc/mirror/config.yml ($MIRROR_CONFIG): mount your own folder there
# (-v ./etc:/etc/mirror:ro); relative paths in it resolve from /etc/mirror.
# The server runs as uid 10001: a bind-mounted data directory must be writable by it
# (chown -R 10001:10001 DIR), else the mirror stops with one line saying so.
FROM python:3.11-slim

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="mirror" \
      org.opencontainers.image.description="A pull-through caching registry for container images" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.documentation="${SOURCE}#readme"

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# The dependencies first, from pyproject.toml alone: a change to the code reuses this layer.
# With the s3 and postgres extras, so one image also runs as a replica of a site
# (deploy/replicas/); a one-machine mirror never imports them.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['s3'] + p['optional-dependencies']['postgres']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
# Then the code, without touching the dependencies again.
COPY mirror ./mirror
RUN pip install --no-deps . && rm -rf /src/build

RUN groupadd --system --gid 10001 mirror \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /var/lib/mirror --shell /usr/sbin/nologin mirror \
    && mkdir -p /var/lib/mirror /etc/mirror \
    && chown 10001:10001 /var/lib/mirror && chmod 0750 /var/lib/mirror
COPY deploy/config.yml /etc/mirror/config.yml
ENV MIRROR_CONFIG=/etc/mirror/config.yml

USER 10001:10001
WORKDIR /var/lib/mirror
VOLUME /var/lib/mirror
EXPOSE 5000
# `mirror healthcheck` reads $MIRROR_CONFIG as the server does: its port, and TLS when set.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["mirror", "healthcheck"]
ENTRYPOINT ["mirror"]
CMD ["serve"]
