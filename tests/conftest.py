import os

from mirror.config import env_settings
from tests.support.fixtures import *  # noqa: F401,F403

# MIRROR_* settings in the developer's shell (MIRROR_LISTEN, MIRROR_DATA_DIR, ...) would
# reach every mirror the suite starts; the tests set what they need themselves.
for _name in env_settings(os.environ):
    del os.environ[_name]
