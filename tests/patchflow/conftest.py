"""Import Prefect (through tasks.night) at collection, so that its log handler binds to pytest's own
stream rather than to the stream ``capsys`` closes after a test that first imports it."""

import tasks.night  # noqa: F401
