"""hift_ext.report: strict-JSON metrics, the append-only log, the plot and the summary."""
import json
import math
import os
from types import SimpleNamespace

from hift_ext.report import MetricsLog, dumps, format_summary, plot_loss, write_metrics_json


def _strict(text):
    def refuse(name):
        raise ValueError(f"bare {name}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_are_written_as_null():
    rec = {"loss": math.nan, "grad_norm": math.inf, "nested": [{"x": -math.inf}], "ok": 1.5}
    assert _strict(dumps(rec)) == {"loss": None, "grad_norm": None, "nested": [{"x": None}], "ok": 1.5}


def test_metrics_log_continues_a_history_and_stays_strict_json(tmp_path):
    p = tmp_path / "metrics.jsonl"
    outside = tmp_path / "outside.jsonl"
    outside.write_text("not yours\n")
    os.symlink(outside, p)  # planted: the log must replace the link, not append through it
    log = MetricsLog(str(p))
    log.start(['{"type": "train", "step": 2, "loss": 0.5}\n'])
    log.emit({"type": "skip", "step": 2, "loss": math.nan, "reason": "non-finite loss"})
    log.close()
    assert outside.read_text() == "not yours\n" and not os.path.islink(p)
    recs = [_strict(line) for line in p.read_text().splitlines()]
    assert recs[0]["step"] == 2 and recs[1] == {"type": "skip", "step": 2, "loss": None, "reason": "non-finite loss"}
    assert log.records() == recs


def test_metrics_log_without_a_directory_keeps_lines_in_memory():
    log = MetricsLog(None)
    log.start([])
    log.emit({"type": "train", "step": 1, "loss": 1.0})
    assert log.records() == [{"type": "train", "step": 1, "loss": 1.0}]


def test_metrics_json_and_plot(tmp_path):
    write_metrics_json(str(tmp_path / "metrics.json"), {"eval_loss": math.nan})
    assert _strict((tmp_path / "metrics.json").read_text()) == {"eval_loss": None}
    recs = [{"type": "train", "step": 1, "loss": 0.7}, {"type": "train", "step": 2, "loss": None},
            {"type": "eval", "step": 2, "eval_accuracy": 0.5}]
    assert plot_loss(recs, str(tmp_path / "loss.png"), "t")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["loss.png", "metrics.json"]  # no temporary files left
    assert not plot_loss([], str(tmp_path / "none.png"), "t")


def _metrics(**kw):
    m = dict(mode="hift", num_groups=2, group_size=4, strategy="up2down", optimizer="adamw", lr=1e-4,
             eval_accuracy=0.8, train_examples_per_s=10.0, train_time_s=5.0, steps=10, epochs=1, device="cpu",
             peak_memory_bytes=1 << 20, peak_memory_kind="rss", optimizer_state_device_bytes=1024,
             optimizer_state_largest_group_bytes=512, optimizer_state_full_ft_bytes=2048, completed=True,
             total_steps=10, skipped_steps=0)
    m.update(kw)
    return m


def test_summary_reports_skipped_steps_and_the_resume_command():
    cfg = SimpleNamespace(output="runs/my run", save_model=True)
    assert "skipped steps" not in format_summary(cfg, _metrics())
    s = format_summary(cfg, _metrics(skipped_steps=3, completed=False, steps=4))
    assert "skipped steps              3 (non-finite" in s
    assert "continue with: hift-ext finetune --resume 'runs/my run'" in s
