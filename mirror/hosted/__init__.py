"""Hosted repositories, pushed to this mirror: upload sessions (uploads.py) and the
store that writes and reads them (store.py). May import the core (cache, models, errors,
fileio, config) and notify.events; never api.py, the proxy or upstreams."""
