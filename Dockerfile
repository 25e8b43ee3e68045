# mirror: a pull-through caching registry.  docker build -t mirror . && docker run -p 5000:5000 -v mirror-data:/data mirror
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY mirror ./mirror
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /data mirror \
    && mkdir -p /data /etc/mirror && chown mirror /data

USER mirror
VOLUME /data
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=4).status != 200)"
# Mount a config at /etc/mirror/config.yml and add: --config /etc/mirror/config.yml
ENTRYPOINT ["mirror", "serve", "--data-dir", "/data"]
