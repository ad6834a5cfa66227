"""The contract between a trial and its training process: what one side writes, the other reads back whole."""

import json

from sweep.trial import protocol


def test_every_event_round_trips_through_the_stream_in_the_wire_format(tmp_path):
    stream = tmp_path / protocol.STREAM_FILE
    sent = [
        protocol.Start(max_iters=8, iters_per_epoch=4, final_step=64, world_size=1, frozen_weights_16bit=0),
        protocol.Train(1, 8, {"train/loss": 2.5, "train/lr": 1e-4, "perf/tokens_per_sec": 10.0}),
        protocol.Val(8, 1, {"val/loss": 2.25, "val/rouge_l": 0.5}, best_step=8, cached=True),
        protocol.Samples(8, [{"step": 8, "question": "谁？", "answer": "我", "repeats": False, "no_stop": True}]),
        protocol.ValAnswers(8, [{"step": 8, "group": "identity", "question": "谁？", "answer": "我我我我"}]),
        protocol.TrainingWarning("no verdict"),
        protocol.End(8, 64, 8, 2.25, False, 0.5, None, str(tmp_path / "best_adapter")),
    ]
    for event in sent:
        protocol.emit(stream, event)
    assert protocol.read_events(stream) == sent
    raw = [json.loads(line) for line in stream.read_text(encoding="utf-8").splitlines()]
    # the flat format benchmarks and users' scripts read
    assert [r["kind"] for r in raw] == ["start", "train", "val", "samples", "val_answers", "warning", "end"]
    assert {cls.table: cls for cls in (protocol.Samples, protocol.ValAnswers)} == protocol.ANSWER_TABLES
    assert raw[1]["train/loss"] == 2.5 and raw[2]["val/loss"] == 2.25 and raw[2]["baseline"] == "cached"
    assert "baseline" not in protocol.Val(0, 0, {}, None).to_json()


def test_a_reader_never_acts_on_half_a_line(tmp_path):
    stream = tmp_path / protocol.STREAM_FILE
    reader = protocol.EventReader(stream)
    assert reader.read() == []  # not written yet
    line = json.dumps(protocol.Val(16, 2, {"val/loss": 1.0}, 16).to_json())
    with stream.open("a") as f:
        f.write(line[:20])
    assert reader.read() == []
    with stream.open("a") as f:
        f.write(line[20:] + "\n")
    (event,) = reader.read()
    assert isinstance(event, protocol.Val) and event.metrics == {"val/loss": 1.0} and event.step == 16
    reader.rewind()
    assert len(reader.read()) == 1


def test_verdict_and_done_files_read_none_until_written_whole(tmp_path):
    control = tmp_path / protocol.CONTROL_FILE
    assert protocol.Verdict.read(control) is None
    control.write_text('{"step": 3')  # what a reader could see of a non-atomic write
    assert protocol.Verdict.read(control) is None
    protocol.Verdict(32, True).write(control)
    assert protocol.Verdict.read(control) == protocol.Verdict(32, True)

    done = tmp_path / protocol.DONE_FILE
    assert protocol.Done.read(done) is None
    protocol.Done(0, pid=7, job=2, model_reused=True, seconds=1.5, held={"rss_mb": 10.0}).write(done)
    read = protocol.Done.read(done)
    assert read.rc == 0 and read.held == {"rss_mb": 10.0}
    assert read.worker_info() == {"pid": 7, "job": 2, "model_reused": True, "rss_mb": 10.0}
    assert json.loads(done.read_text())["rss_mb"] == 10.0  # flat, as the benchmarks read worker.json


def test_the_hook_settings_are_what_the_rendered_config_hands_the_hook():
    settings = protocol.HookSettings("val/loss", "less", 32, 100, "/s", "/c", "/a")
    config = settings.as_config()
    assert config["type"] == protocol.HOOK_TYPE
    assert protocol.HookSettings(**{k: v for k, v in config.items() if k != "type"}) == settings
    job = protocol.Job(["cfg.py", "--work-dir", "w"], "train.log", "worker.json")
    assert protocol.Job.from_line(job.to_line().decode()) == job


def test_the_training_side_names_resolve_to_its_classes():
    """The rendered config names them as strings: a move of a class must move its name here too."""
    from mmengine.utils import get_object_from_string

    for name in (
        protocol.HOOK_TYPE,
        protocol.VAL_METRIC_TYPE,
        protocol.CPU_AMP_WRAPPER_TYPE,
        protocol.MEMORY_HOOK_TYPE,
    ):
        assert get_object_from_string(name) is not None, name
    import importlib

    assert importlib.util.find_spec(protocol.WORKER_MODULE) is not None


def test_a_stream_with_missing_or_extra_keys_still_reads(tmp_path):
    """A training process of another version (or a test's stand-in) may write fewer or more fields."""
    stream = tmp_path / protocol.STREAM_FILE
    stream.write_text(
        '{"kind": "start", "final_step": 64, "new_field": 1}\n{"kind": "end", "step": 64}\n{"kind": "x"}\n'
    )
    start, end = protocol.read_events(stream)
    assert start.final_step == 64 and start.max_iters is None
    assert end.step == 64 and end.val_seconds is None
