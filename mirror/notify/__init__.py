"""Notifications (webhooks) as registry:2 sends them: events.py builds events and holds
the emit hook (standard library only, so any layer may call it), queue.py the bounded
on-disk queue per endpoint, delivery.py the Notifier (buffer, flush, send). May import
config, metrics and fileio; never api.py, the proxy or upstreams."""
