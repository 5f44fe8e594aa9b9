"""The metrics writer: JSON lines, scalars, and routing distributions as per-expert histograms."""
import json

import pytest

from fedalign_dist.metrics import MetricsWriter


def test_routing_distributions_become_histograms_over_the_expert_index(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    writer = MetricsWriter(tmp_path)
    consensus = [[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]
    writer.write({"round": 3, "aligned_fraction": 0.75, "tau_mean": None,
                  "routing": {"consensus": consensus, "prior": consensus[::-1]}})
    writer.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["routing"]["consensus"] == consensus
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0}).Reload()
    assert events.Scalars("aligned_fraction")[0].value == pytest.approx(0.75)
    tags = events.Tags()["histograms"]
    assert {"routing/consensus/layer0", "routing/consensus/layer1", "routing/prior/layer0"} <= set(tags)
    hist = events.Histograms("routing/consensus/layer0")[0]
    assert hist.step == 3
    assert list(hist.histogram_value.bucket) == pytest.approx(consensus[0])
    assert list(hist.histogram_value.bucket_limit) == [1.0, 2.0, 3.0, 4.0]
