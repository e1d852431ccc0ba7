"""``python -m chatstream_asgi serve``: its options grouped like the config objects, the config objects it builds,
and its engine choice: one model, one model per listed device, or the mock."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch

from chatstream_asgi import EngineReplicas, GenerationConfig, Limits, MockEngine, RoutesConfig, SamplingParams, Timeouts
from chatstream_asgi.cli import build_parser, configs, default_params, devices_of, load_engine, main
from chatstream_asgi.errors import ConfigurationError


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_a_device_list_loads_one_replica_per_device(tiny_model_dir: Path) -> None:
    engine = load_engine(serve_args("--model", str(tiny_model_dir), "--device", "cpu, cpu", "--max-concurrency", "3"))
    assert isinstance(engine, EngineReplicas)
    assert [type(e).__name__ for e in engine.engines] == ["TransformersEngine", "TransformersEngine"]
    assert [e.max_batch_size for e in engine.engines] == [3, 3]  # type: ignore[attr-defined]
    assert engine.engines[0] is not engine.engines[1]


def test_engine_process_serves_each_device_from_its_own_engine_process(tiny_model_dir: Path) -> None:
    argv = ("--model", str(tiny_model_dir), "--engine-process", "--max-concurrency", "3")
    single = load_engine(serve_args(*argv))
    assert type(single).__name__ == "ProcessEngine"
    assert single.max_batch_size == 3 and single.model_name == tiny_model_dir.name
    replicas = load_engine(serve_args(*argv, "--device", "cpu,cpu"))
    assert isinstance(replicas, EngineReplicas)
    assert [type(e).__name__ for e in replicas.engines] == ["ProcessEngine", "ProcessEngine"]
    assert replicas.engines[0].address != replicas.engines[1].address  # type: ignore[attr-defined]


def test_engine_threads_reach_the_engine_process(tiny_model_dir: Path) -> None:
    engine = load_engine(serve_args("--model", str(tiny_model_dir), "--engine-threads", "3", "--engine-process"))
    assert engine.launcher.spec["torch_threads"] == 3  # type: ignore[attr-defined]


def test_the_engine_process_hang_timeout_is_an_option(tiny_model_dir: Path) -> None:
    argv = ("--model", str(tiny_model_dir), "--engine-process")
    assert load_engine(serve_args(*argv)).hang_timeout == 60.0  # type: ignore[attr-defined]
    assert load_engine(serve_args(*argv, "--engine-hang-timeout", "300")).hang_timeout == 300.0  # type: ignore[attr-defined]
    assert load_engine(serve_args(*argv, "--engine-hang-timeout", "0")).hang_timeout is None  # type: ignore[attr-defined]
    with pytest.raises(SystemExit, match="needs --engine-process"):
        load_engine(serve_args("--model", str(tiny_model_dir), "--engine-hang-timeout", "30"))
    with pytest.raises(ConfigurationError, match="hang_timeout must be seconds >= 2"):
        load_engine(serve_args(*argv, "--engine-hang-timeout", "0.5"))


def test_the_in_thread_engine_runs_torch_on_all_cores_but_one_or_as_told(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    default = load_engine(serve_args("--model", str(tiny_model_dir)))
    told = load_engine(serve_args("--model", str(tiny_model_dir), "--engine-threads", "3"))
    cores = len(os.sched_getaffinity(0))
    assert (default.torch_threads, told.torch_threads) == (max(1, cores - 1), 3)  # type: ignore[attr-defined]
    assert torch.get_num_threads() == before  # the server's own threads: set in the model's worker thread only


def test_one_device_loads_one_engine(tiny_model_dir: Path) -> None:
    engine = load_engine(serve_args("--model", str(tiny_model_dir), "--device", "cpu"))
    assert type(engine).__name__ == "TransformersEngine"
    assert engine.prefix_cache.capacity_bytes > 0  # type: ignore[attr-defined]


def test_the_prefix_cache_budget_reaches_the_engine(tiny_model_dir: Path) -> None:
    off = load_engine(serve_args("--model", str(tiny_model_dir), "--prefix-cache-bytes", "0"))
    sized = load_engine(serve_args("--model", str(tiny_model_dir), "--prefix-cache-bytes", "1000000"))
    assert off.prefix_cache_stats().capacity_bytes == 0  # type: ignore[attr-defined]
    assert sized.prefix_cache_stats().capacity_bytes == 1_000_000  # type: ignore[attr-defined]


@pytest.mark.parametrize("device", ["cpu,", ",cpu", "cpu,,cpu"])
def test_an_empty_entry_in_the_device_list_is_refused(tiny_model_dir: Path, device: str) -> None:
    with pytest.raises(SystemExit) as refused:
        load_engine(serve_args("--model", str(tiny_model_dir), "--device", device))
    assert "comma-separated list" in str(refused.value)


@pytest.mark.parametrize("bad", [["--model", "/nonexistent/model"], ["--model", "TINY", "--device", "bogus"]])
def test_a_model_that_cannot_load_is_one_line_and_exit_2(
    bad: list[str], capsys: pytest.CaptureFixture[str], tiny_model_dir: Path
) -> None:
    # a folder without a model, a device torch does not know: was a long traceback
    argv = [str(tiny_model_dir) if part == "TINY" else part for part in bad]
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert "cannot load the model" in err and "Traceback" not in err


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_a_port_out_of_range_is_refused(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    # uvicorn bound 99999 % 65536 while it logged 99999
    with pytest.raises(SystemExit) as refused:
        serve_args("--mock", "--port", port)
    assert refused.value.code == 2 and "a port is 0-65535" in capsys.readouterr().err
    assert serve_args("--mock", "--port", "65535").port == 65535


def test_without_device_the_model_goes_where_torch_finds_a_gpu(tiny_model_dir: Path) -> None:
    engine = load_engine(serve_args("--model", str(tiny_model_dir)))  # "auto": cuda when available (tests/cuda)
    assert engine.model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")  # type: ignore[attr-defined]
    assert serve_args("--mock").device is None and devices_of(serve_args("--mock")) == ["auto"]


def test_the_mock_takes_the_concurrency_as_its_batch_size() -> None:
    engine = load_engine(serve_args("--mock", "--max-concurrency", "5", "--mock-token-delay", "0"))
    assert isinstance(engine, MockEngine) and engine.max_batch_size == 5 and engine.token_delay == 0


@pytest.mark.parametrize(
    ("argv", "temperature", "penalty"),
    [
        ([], 0.0, 1.1),  # the embedded SmolLM2: greedy (see EMBEDDED_PARAMS), no loops
        (["--temperature", "0.5"], 0.5, 1.1),
        (["--mock"], SamplingParams().temperature, 1.0),
        (["--model", "some/dir", "--temperature", "0"], 0.0, 1.0),
    ],
)
def test_sampling_defaults_suit_the_served_model(argv: list[str], temperature: float, penalty: float) -> None:
    params = default_params(serve_args(*argv))
    assert (params.temperature, params.repetition_penalty) == (temperature, penalty)


def test_the_help_groups_the_options_like_the_config_objects(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        serve_args("--help")
    help_text = capsys.readouterr().out
    sections = {}
    for title in ("server", "engine", "limits", "timeouts", "sessions", "generation", "routes"):
        assert f"\n{title}:\n" in help_text
        sections[title] = help_text.split(f"\n{title}:\n", 1)[1].split("\n\n", 2)[1]  # after the description
    assert "--max-concurrency" in sections["limits"] and "--max-queue" in sections["limits"]
    assert "--drain-timeout" in sections["timeouts"] and "--secret-key" in sections["sessions"]
    assert "--temperature" in sections["generation"] and "--no-ui" in sections["routes"]
    assert "--model" in sections["engine"] and "--port" in sections["server"]


def test_the_options_become_config_objects() -> None:
    args = serve_args("--mock", "--max-concurrency", "3", "--max-queue", "9", "--drain-timeout", "4", "--no-ui")
    args.system_prompt = "Be brief."
    built = configs(args, MockEngine())
    assert built["limits"] == Limits(max_concurrency=3, max_queue=9)
    assert built["timeouts"] == Timeouts(drain=4.0, drain_on_signals=True)
    assert built["generation"] == GenerationConfig(system_prompt="Be brief.", default_params=default_params(args))
    assert built["routes"] == RoutesConfig(ui_path=None)
    unfrozen = configs(serve_args("--mock", "--no-freeze-gc", "--no-drain-on-signals"), MockEngine())["timeouts"]
    assert unfrozen == Timeouts(drain_on_signals=False, freeze_gc=False)
