from __future__ import annotations

import argparse
from pathlib import Path

from idios.settings import Settings, add_arguments, from_args


def test_environment_then_flags() -> None:
    env = {"IDIOS_PORT": "5000", "IDIOS_ALLOW_PRIVATE_URLS": "1", "IDIOS_DATA_DIR": "/srv/idios", "IDIOS_MAX_WAIT_MS": "2.5"}
    s = Settings.from_env(env)
    assert (s.port, s.allow_private_urls, s.data_dir, s.max_wait_ms) == (5000, True, Path("/srv/idios"), 2.5)
    assert s.is_milvus_lite and s.milvus_target == "/srv/idios/milvus.db" and s.vector_index == "FLAT"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    s = from_args(parser.parse_args(["--port", "6000", "--no-allow-private-urls"]), env)
    assert s.port == 6000 and s.allow_private_urls is False and s.data_dir == Path("/srv/idios")


def test_a_milvus_server_uri_switches_index_and_target() -> None:
    s = Settings.from_env({"IDIOS_MILVUS_URI": "http://milvus:19530"})
    assert not s.is_milvus_lite and s.milvus_target == "http://milvus:19530" and s.vector_index == "HNSW"


def test_the_service_never_imports_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, idios.__main__, idios.api.app, idios.workerproc, idios.consumer, idios.amqp; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
