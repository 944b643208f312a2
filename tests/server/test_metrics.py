"""The Prometheus endpoint: open like /healthz, and it counts engine work."""

from __future__ import annotations

import re

from starlette.testclient import TestClient
from test_training_routes import fwd_body, post_fwd


def _value(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert match, f"{name}{labels} missing from:\n{text}"
    return float(match.group(1))


def test_metrics_need_no_api_key_and_count_training_tokens(api, client: TestClient, engine) -> None:
    model_id = api.model(api.session())
    before = client.get("/metrics", headers={"X-API-Key": ""})
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    assert _value(before.text, "tuft_queue_depth", f'{{base_model="{engine.name}"}}') == 0
    assert _value(before.text, "tuft_xla_compiles_total") >= 0

    future = post_fwd(client, fwd_body(model_id, 1, tokens=[1, 2, 3, 4, 5, 6])).json()
    api.result(future["request_id"])
    text = client.get("/metrics").text
    labels = f'{{base_model="{engine.name}",call="forward_backward"}}'
    assert _value(text, "tuft_engine_calls_total", labels) == 1
    assert _value(text, "tuft_tokens_total", labels) == 6
    assert _value(text, "tuft_tokens_per_second", labels) > 0


def test_kv_cache_figures_are_exported_per_base_model(client: TestClient, engine) -> None:
    text = client.get("/metrics").text
    model = f'base_model="{engine.name}"'
    stats = engine.kv_cache_stats()
    for state in ("used", "cached_idle", "free"):
        assert _value(text, "tuft_kv_blocks", f'{{{model},state="{state}"}}') == getattr(stats, state)
    assert _value(text, "tuft_kv_block_bytes", f"{{{model}}}") == stats.bytes_per_block
    for name in ("prefix_hit_blocks_total", "prefix_lookup_blocks_total", "preemptions_total"):
        assert _value(text, f"tuft_kv_{name}", f"{{{model}}}") == 0
