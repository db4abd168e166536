import pytest

from service.settings import Settings


def test_batching_switch_and_its_errors(monkeypatch):
    monkeypatch.setenv("BATCHING", "off")
    monkeypatch.setenv("BATCH_MAX_SIZE", "1")
    assert Settings.from_env().batching is False  # a size of 1 is fine when batching is off

    monkeypatch.setenv("BATCHING", "on")
    with pytest.raises(SystemExit, match="BATCH_MAX_SIZE must be at least 2; set BATCHING=off"):
        Settings.from_env()

    monkeypatch.setenv("BATCHING", "sometimes")
    with pytest.raises(SystemExit, match="BATCHING='sometimes' is not on/off"):
        Settings.from_env()


def test_the_removed_bentoml_batcher_is_named_not_ignored(monkeypatch):
    monkeypatch.setenv("BATCHER", "bentoml")
    with pytest.raises(SystemExit, match="BATCHER='bentoml': the setting was removed"):
        Settings.from_env()
    monkeypatch.setenv("BATCHER", "runtime")  # what it always meant
    assert Settings.from_env().batching


def test_numbers_are_checked(monkeypatch):
    monkeypatch.setenv("SERVICE_WORKERS", "two")
    with pytest.raises(SystemExit, match="SERVICE_WORKERS='two' is not an integer"):
        Settings.from_env()


def test_batches_hold_the_largest_request_so_none_is_split(monkeypatch):
    monkeypatch.setenv("MAX_IMAGES_PER_REQUEST", "64")
    assert Settings.from_env().batch_max_size == 64
    monkeypatch.setenv("BATCH_MAX_SIZE", "16")
    assert Settings.from_env().batch_max_size == 16


@pytest.mark.parametrize("value", [None, "", "auto"])
def test_workers_default_to_one_per_usable_core(monkeypatch, value):
    from service.compute import usable_cores

    if value is None:
        monkeypatch.delenv("SERVICE_WORKERS", raising=False)
    else:
        monkeypatch.setenv("SERVICE_WORKERS", value)
    assert Settings.from_env().workers == usable_cores() >= 1
    monkeypatch.setenv("SERVICE_WORKERS", "3")
    assert Settings.from_env().workers == 3


@pytest.mark.parametrize(("cpu_max", "cap"), [("max 100000", None), ("150000 100000", 2), ("50000 100000", 1), ("junk", None)])
def test_usable_cores_respect_a_container_cpu_quota(tmp_path, cpu_max, cap):
    import os

    from service.compute import usable_cores

    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path / "cpu.max") == (min(affinity, cap) if cap else affinity)
    assert usable_cores(tmp_path / "absent") == affinity


def test_the_warm_up_covers_batch_sizes_up_to_the_largest_batch(monkeypatch):
    assert Settings.from_env().warmup_sizes == 64
    monkeypatch.setenv("MAX_IMAGES_PER_REQUEST", "16")
    assert Settings.from_env().warmup_sizes == 16  # no batch can be larger
    monkeypatch.setenv("WARMUP_BATCH_SIZES", "0")
    assert Settings.from_env().warmup_sizes == 1  # the one call that proves the model answers
