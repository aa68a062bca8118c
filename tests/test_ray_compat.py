"""Each private part of Ray that proco_ray/ray_compat.py reads, checked against the installed Ray.

A Ray upgrade that renames, moves or reshapes one fails here, naming the internal and what depends on it.
No Ray cluster is started.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import json
import logging
import re
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import ray

from proco_ray import ray_compat
from proco_ray.launch.cluster import DROPPED_LINES
from proco_ray.runs import RunFolder

CONTEXT_MODULE = "ray.train.v2._internal.execution.context"


def import_internal(name: str, needed_by: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        pytest.fail(f"Ray {ray.__version__} has no module {name} ({error}); {needed_by} depends on it")


def test_the_installed_ray_is_the_one_the_internals_were_read_from():
    assert ray.__version__ == ray_compat.RAY_VERSION, (
        f"ray_compat.py was read from Ray {ray_compat.RAY_VERSION}, Ray {ray.__version__} is installed: check each "
        "entry of ray_compat.py against it (the other tests here), then update RAY_VERSION"
    )


# --------------------------------------------------------------------------- Ray Train's checkpoint snapshot


def test_the_snapshot_file_name_is_the_one_ray_train_writes_in_the_run_folder(tmp_path):
    constants = import_internal("ray.train.v2._internal.constants", "ray_compat.RAY_TRAIN_SNAPSHOT")
    theirs = getattr(constants, "CHECKPOINT_MANAGER_SNAPSHOT_FILENAME", None)
    assert theirs == ray_compat.RAY_TRAIN_SNAPSHOT, (
        f"ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME is {theirs!r}, not "
        f"{ray_compat.RAY_TRAIN_SNAPSHOT!r}: resume (RunFolder.resumed_epoch), the orphan clean-up and "
        "RunFolder.best_checkpoint read Ray Train's snapshot by that name"
    )
    storage = import_internal("ray.train.v2._internal.execution.storage", "ray_compat.RAY_TRAIN_SNAPSHOT")
    context = storage.StorageContext(storage_path=str(tmp_path), experiment_dir_name="run", read_only=True)
    assert context.checkpoint_manager_snapshot_path == f"{tmp_path}/run/{ray_compat.RAY_TRAIN_SNAPSHOT}", (
        "StorageContext.checkpoint_manager_snapshot_path is no longer <storage>/<run>/"
        f"{ray_compat.RAY_TRAIN_SNAPSHOT}: RunFolder.snapshot looks for it there"
    )


def test_the_snapshot_format_has_the_fields_ray_compat_reads():
    manager = import_internal("ray.train.v2._internal.execution.checkpoint.checkpoint_manager", "ray_compat.parse_train_snapshot")
    state, entry = manager._CheckpointManagerState.model_fields, manager._TrainingResultState.model_fields
    for field in ("latest_checkpoint_result", "checkpoint_results", "pending_training_results"):
        assert field in state, (
            f"Ray Train's snapshot (_CheckpointManagerState) has no field {field!r}: ray_compat.parse_train_snapshot "
            "reads it for resume, the orphan clean-up and a run folder's best checkpoint"
        )
    for field in ("checkpoint_dir_name", "metrics"):
        assert field in entry, (
            f"an entry of Ray Train's snapshot (_TrainingResultState) has no field {field!r}: "
            "ray_compat.parse_train_snapshot reads it"
        )


def test_a_snapshot_written_by_ray_trains_checkpoint_manager_reads_back(tmp_path):
    """Ray's own CheckpointManager registers four checkpoints (the worst deleted, the last pending validation);
    what proco_ray reads of the snapshot it wrote matches what Ray kept."""
    from ray.train import Checkpoint, CheckpointConfig

    storage = import_internal("ray.train.v2._internal.execution.storage", "ray_compat.RAY_CHECKPOINT_DIR")
    manager_module = import_internal(
        "ray.train.v2._internal.execution.checkpoint.checkpoint_manager", "ray_compat.parse_train_snapshot"
    )
    report_module = import_internal("ray.train.v2._internal.execution.training_report", "this test")
    context = storage.StorageContext(storage_path=str(tmp_path), experiment_dir_name="run")
    config = CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="score", checkpoint_score_order="max")
    names: list[str] = []

    async def register_four() -> None:
        manager = manager_module.CheckpointManager(config, context)
        for epoch, score in ((1, 0.5), (2, 0.1), (3, 0.3), (4, 0.05)):
            local = tmp_path / "local" / str(epoch)
            local.mkdir(parents=True)
            (local / "state.pt").write_bytes(b"x")
            names.append(storage.StorageContext.make_default_checkpoint_dir_name())
            assert ray_compat.RAY_CHECKPOINT_DIR.fullmatch(names[-1]), (
                f"Ray Train names checkpoint folders like {names[-1]!r} (StorageContext.make_default_checkpoint_dir_name), "
                "which ray_compat.RAY_CHECKPOINT_DIR does not match: remove_unregistered_checkpoints would remove no orphan"
            )
            checkpoint = context.persist_current_checkpoint(Checkpoint(str(local)), names[-1])
            report = report_module._TrainingReport(checkpoint, {"epoch": epoch, "score": score}, epoch == 4)
            manager.register_checkpoint(report)

    asyncio.run(register_four())
    run = tmp_path / "run"
    on_disk = {p.name for p in run.iterdir() if p.is_dir()}
    assert on_disk == {names[0], names[2], names[3]}, f"Ray Train kept {on_disk} of {names}"
    snapshot = RunFolder.at(str(run)).snapshot()
    assert snapshot is not None, f"Ray Train wrote no {ray_compat.RAY_TRAIN_SNAPSHOT} in the run folder {run}"
    message = "ray_compat.parse_train_snapshot misreads the snapshot Ray Train wrote: {}"
    assert snapshot.latest is not None and snapshot.latest.dir_name == names[3], message.format("latest_checkpoint_result")
    assert RunFolder.at(str(run)).resumed_epoch() == 4, message.format(
        "the latest checkpoint's metrics (RunFolder.resumed_epoch)"
    )
    assert [c.dir_name for c in snapshot.pending] == [names[3]], message.format("pending_training_results")
    assert {c.dir_name for c in snapshot.kept} >= {names[0], names[2]}, message.format("checkpoint_results")
    assert snapshot.dir_names() == on_disk, message.format("the checkpoints it lists")
    orphan = storage.StorageContext.make_default_checkpoint_dir_name()
    (run / orphan).mkdir()
    assert RunFolder.at(str(run)).remove_unregistered_checkpoints() == [orphan]
    assert {p.name for p in run.iterdir() if p.is_dir()} == on_disk


# --------------------------------------------------------------------------- the cluster this machine runs


def test_the_recorded_cluster_is_found_through_rays_services(tmp_path):
    services = import_internal("ray._private.services", "ray_compat.find_bootstrap_address and parse_address")
    for name, parameters in (("find_bootstrap_address", ["temp_dir"]), ("parse_address", ["address"])):
        function = getattr(services, name, None)
        assert function is not None, (
            f"ray._private.services.{name} is gone: cluster.cluster_address uses it (through ray_compat) to join "
            "the cluster `ray start` recorded"
        )
        assert list(inspect.signature(function).parameters) == parameters, (
            f"ray._private.services.{name}{inspect.signature(function)} no longer takes {parameters}: ray_compat.{name} calls it so"
        )
    assert ray_compat.find_bootstrap_address(str(tmp_path)) is None, (
        "ray._private.services.find_bootstrap_address found a cluster where none was recorded"
    )
    (tmp_path / "ray_current_cluster").write_text("10.0.0.5:6379\n")
    assert ray_compat.find_bootstrap_address(str(tmp_path)) == "10.0.0.5:6379", (
        "ray._private.services.find_bootstrap_address no longer reads <temp_dir>/ray_current_cluster: "
        "cluster.cluster_address would not join the cluster `ray start` recorded"
    )
    parsed = {a: ray_compat.parse_address(a) for a in ("127.0.0.1:6379", "[::1]:80", "nonsense")}
    assert parsed == {"127.0.0.1:6379": ("127.0.0.1", "6379"), "[::1]:80": ("::1", "80"), "nonsense": None}, (
        f"ray._private.services.parse_address now parses {parsed}: cluster.reachable expects (host, port) or None"
    )


# --------------------------------------------------------------------------- loggers of lines kept off the screen


def test_the_execution_finished_line_comes_from_the_streaming_executors_logger():
    name = ray_compat.STREAMING_EXECUTOR_LOGGER
    assert importlib.util.find_spec(name) is not None, (
        f"Ray has no module {name}: cluster.DROPPED_LINES filters Ray Data's 'Dataset ... execution finished' "
        "line on that module's logger"
    )
    executor = import_internal(name, "cluster.DROPPED_LINES")
    logger = getattr(executor, "logger", None)
    assert isinstance(logger, logging.Logger) and logger.name == name, (
        f"{name} no longer logs through logging.getLogger(__name__): cluster.DROPPED_LINES filters the logger named {name}"
    )
    assert "execution finished in" in inspect.getsource(executor), (
        f"{name} no longer prints 'Dataset ... execution finished in': cluster.DROPPED_LINES filters it there"
    )
    from ray.data.context import OK_PREFIX

    line = f"{OK_PREFIX} Dataset train_035A9 execution finished in 4.38 seconds"
    assert re.match(DROPPED_LINES[name], line), f"cluster.DROPPED_LINES[{name!r}] does not match Ray Data's line {line!r}"


def test_token_authentication_is_chosen_the_way_ray_turns_its_default_on():
    setup = import_internal("ray._private.authentication.authentication_token_setup", "ray_compat.choose_token_authentication")
    assert callable(getattr(setup, "_enable_token_auth", None)), (
        "Ray has no _enable_token_auth: ray_compat.choose_token_authentication calls it so that this process sends "
        "the token of the local Ray it starts"
    )
    default = inspect.getsource(setup.enable_token_auth_by_default)
    assert "_enable_token_auth()" in default and "_warn_token_auth_enabled()" in default, (
        "Ray turns token authentication on by default differently now: check ray_compat.choose_token_authentication"
    )


def test_the_progress_bars_off_notice_is_logged_once_under_the_key_ray_compat_takes():
    progress = import_internal("ray.data._internal.progress", "ray_compat.PROGRESS_BARS_OFF_NOTICE")
    source = inspect.getsource(progress.get_progress_manager)
    assert f'log_once("{ray_compat.PROGRESS_BARS_OFF_NOTICE}")' in source and "Progress bars disabled" in source, (
        "Ray Data no longer guards its 'Progress bars disabled' warning with log_once"
        f"({ray_compat.PROGRESS_BARS_OFF_NOTICE!r}): ray_compat.skip_progress_bars_off_notice takes that key to keep it quiet"
    )


def test_data_sink_lines_come_from_the_dataset_logger_that_dropped_lines_filters():
    dataset = import_internal("ray.data.dataset", "cluster.DROPPED_LINES")
    assert dataset.logger.name == "ray.data.dataset" and '"Data sink %s finished. %d rows and %s data written."' in (
        inspect.getsource(dataset)
    ), "Ray Data's 'Data sink ... finished' line moved: cluster.DROPPED_LINES filters it on the ray.data.dataset logger"
    assert re.match(DROPPED_LINES["ray.data.dataset"], "Data sink Parquet finished. 1512 rows and 1.2MB data written.")


def test_the_report_line_comes_from_a_logger_named_by_the_train_context_file():
    assert importlib.util.find_spec(CONTEXT_MODULE) is not None, (
        f"Ray has no module {CONTEXT_MODULE}: train_worker.quiet_report_lines names the logger of Ray Train's "
        "'Reporting training result' line by its file (ray_compat.train_report_logger_name)"
    )
    context = import_internal(CONTEXT_MODULE, "train_worker.quiet_report_lines")
    name = ray_compat.train_report_logger_name()
    logger = getattr(context, "logger", None)
    assert name is not None and isinstance(logger, logging.Logger) and logger.name == name, (
        f"{CONTEXT_MODULE} no longer logs through logging.getLogger(__file__) ({logger}): "
        "train_worker.quiet_report_lines quiets the logger ray_compat.train_report_logger_name names"
    )
    assert "Reporting training result" in inspect.getsource(context), (
        f"{CONTEXT_MODULE} no longer prints 'Reporting training result': train_worker.quiet_report_lines quiets it there"
    )


# --------------------------------------------------------------------------- Tune's HParams table


def test_tunes_tensorboard_logger_still_passes_the_hparams_metrics_through_try_log_hparams():
    from ray.tune.logger import TBXLoggerCallback

    method = getattr(TBXLoggerCallback, "_try_log_hparams", None)
    assert method is not None, (
        "ray.tune.logger.TBXLoggerCallback has no _try_log_hparams: ray_compat.HParamsFilterLogger overrides it "
        "so that tune.HParamsLogger keeps only the headline metrics in the HParams table"
    )
    assert list(inspect.signature(method).parameters) == ["self", "trial", "result"], (
        f"TBXLoggerCallback._try_log_hparams{inspect.signature(method)} no longer takes (trial, result): "
        "ray_compat.HParamsFilterLogger overrides it so"
    )


class _Trial:
    evaluated_params = {"optim.lr": 0.1}


def test_the_hparams_hook_filters_what_tune_writes_at_a_trials_end():
    """A trial's end, as Tune's real log_trial_end and _try_log_hparams run it (a mock TensorBoard writer)."""
    seen: list[dict[str, Any]] = []

    class Keep(ray_compat.HParamsFilterLogger):
        def hparams_metrics(self, result: dict[str, Any]) -> dict[str, Any]:
            seen.append(result)
            return {"val/accuracy": result["val/accuracy"]}

    logger, trial, writer = Keep(), _Trial(), mock.MagicMock()
    logger._trial_writer = {trial: writer}
    logger._trial_result = {trial: {"val/accuracy": 0.5, "train/loss": 1.5}}
    logger.log_trial_end(trial)
    assert seen == [{"val/accuracy": 0.5, "train/loss": 1.5}], (
        "TBXLoggerCallback.log_trial_end no longer calls _try_log_hparams with the trial's metrics: "
        "ray_compat.HParamsFilterLogger.hparams_metrics (tune.HParamsLogger's filter) is never applied"
    )
    summaries = [c.args[0].SerializeToString() for c in writer.file_writer.add_summary.call_args_list]
    assert summaries and any(b"val/accuracy" in s for s in summaries), (
        "TBXLoggerCallback._try_log_hparams wrote no HParams summary of the metrics it was given"
    )
    assert not any(b"train/loss" in s for s in summaries), "a metric the hook dropped reached the HParams table"


def test_the_snapshot_parser_reads_rays_json_keys():
    """The keys parse_train_snapshot reads, as tests/test_trainer.py writes them by hand."""
    text = json.dumps(
        {
            "checkpoint_results": [{"checkpoint_dir_name": "a", "metrics": {"epoch": 1}}],
            "latest_checkpoint_result": {"checkpoint_dir_name": "b", "metrics": {"epoch": 2}},
            "pending_training_results": [{"checkpoint_dir_name": "b", "metrics": {"epoch": 2}}],
        }
    )
    snapshot = ray_compat.parse_train_snapshot(text)
    assert snapshot.latest == ray_compat.RegisteredCheckpoint("b", {"epoch": 2})
    assert snapshot.dir_names() == {"a", "b"}
    assert ray_compat.parse_train_snapshot("{}") == ray_compat.TrainSnapshot(None, [], [])


def test_ray_compat_is_the_only_module_that_reads_rays_private_parts():
    package = Path(ray_compat.__file__).parent
    private = re.compile(r"ray\._private|\._internal\b|_try_log_hparams|checkpoint_manager_snapshot")
    readers = sorted(
        str(path.relative_to(package)) for path in package.rglob("*.py") if private.search(path.read_text(encoding="utf-8"))
    )
    assert readers == ["ray_compat.py"], f"modules naming Ray's private parts outside ray_compat.py: {readers}"
