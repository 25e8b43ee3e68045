"""Where blobs' bytes live: s3.py keeps them in an S3-compatible object store (the
filesystem store is still cache.py + cache_files.py). May import models, errors and
fileio; never the index, api.py, the proxy or upstreams."""
