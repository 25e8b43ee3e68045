"""The web page at ``/ui/``: routes (routes.py), who is looking and what they may do
(session.py), and the Jinja2 templates and static files shipped inside the package.
May import everything below api.py (cache, index, auth, metrics, remove, hosted);
nothing below imports it."""
