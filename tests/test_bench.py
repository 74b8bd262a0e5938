"""The benchmarks run end to end at toy size and report consistent numbers."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_attention_benchmark_runs_and_reports_ratios(tmp_path):
    out = tmp_path / "attention.json"
    cmd = [sys.executable, "-m", "bench.attention", "--widths", "T", "--tokens", "64", "256",
           "--attention", "mhsa", "vca", "diffattn", "--reps", "2", "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["tokens"], r["pass"]) for r in rows] == [
        (64, "fwd"), (64, "fwd+bwd"), (256, "fwd"), (256, "fwd+bwd")
    ]  # fmt: skip
    for row in rows:
        for kind in ("vca", "diffattn"):
            expected = row["ms"]["mhsa"] / row["ms"][kind]
            assert abs(row["speedup_vs_mhsa"][kind] - expected) < 1e-9 * expected
        assert all(mb >= 0 for mb in row["peak_mb"].values())
    assert "| T | 256 | fwd+bwd |" in result.stdout


def test_attention_benchmark_times_the_mixing_alone(tmp_path):
    """--part mixing feeds the qkv projection's output to `mix`, skipping both projections."""
    out = tmp_path / "mixing.json"
    cmd = [sys.executable, "-m", "bench.attention", "--widths", "T", "--tokens", "64",
           "--part", "mixing", "--attention", "mhsa", "vca", "vca@triton", "--reps", "1",
           "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["part"] for r in rows} == {"mixing"} and len(rows) == 2
    assert all(r["peak_mb"]["vca"] >= 0 and r["ms"]["vca@triton"] > 0 for r in rows)


def test_attention_benchmark_compiles_the_layers_and_counts_what_they_save(tmp_path):
    """--compile times inductor-compiled layers, each stream kernel its own mixer; on the CPU
    the memory it reports is the bytes saved for the backward (no peak: the op-by-op count
    cannot see inside inductor's kernels)."""
    out = tmp_path / "attention-compiled.json"
    cmd = [sys.executable, "-m", "bench.attention", "--compile", "--widths", "T", "--tokens",
           "64", "--attention", "mhsa", "vca@aten", "vca@traced", "--reps", "1",
           "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["pass"] for r in rows] == ["fwd", "fwd+bwd"] and all(r["compiled"] for r in rows)
    assert "peak_mb" not in rows[1] and all(mb > 0 for mb in rows[1]["saved_mb"].values())
    assert "| T | 64 | fwd+bwd |" in result.stdout
    report = subprocess.run([sys.executable, "-m", "bench.report", "--dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert report.returncode == 0, report.stderr[-2000:]
    page = (tmp_path / "README.md").read_text()
    assert "## Attention layer, compiled, time, memory saved: MHSA against VCA" in page
    saved = rows[1]["saved_mb"]
    assert f"| {saved['vca@traced']:.1f} | {saved['vca@aten'] / saved['mhsa']:.2f}x |" in page


def test_saved_memory_counts_what_the_backward_keeps_beyond_input_and_weights():
    """A linear layer keeps only its input and weight: nothing counted; a GELU after it keeps
    the linear layer's (B, N, C) output: B N C 4 bytes."""
    import torch

    from bench.attention import saved_memory_mb

    x = torch.randn(2, 16, 8, requires_grad=True)
    linear = torch.nn.Linear(8, 8)
    assert saved_memory_mb(linear, x, "mhsa") == 0
    assert saved_memory_mb(torch.nn.Sequential(linear, torch.nn.GELU()), x, "mhsa") == (
        2 * 16 * 8 * 4 / 2**20
    )


def test_a_vca_at_triton_mixer_runs_forward_and_backward_in_the_triton_kernels(monkeypatch):
    """The kernel is set around the backward too, and restored after (interpreted on the CPU)."""
    pytest.importorskip("triton")
    import torch

    from bench.attention import make_layer, run_once
    from models import attention, triton_streams

    calls = []
    for name in ("forward", "backward"):
        kernel = getattr(triton_streams, name)
        spy = lambda *args, kernel=kernel, name=name: calls.append(name) or kernel(*args)  # noqa: E731
        monkeypatch.setattr(triton_streams, name, spy)
    device = torch.device("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda")
    layer, width = make_layer("vca@triton", "T", 64, device, torch.float32, "mixing")
    x = torch.randn(1, 64, width, device=device, requires_grad=True)
    run_once(layer, x, True, "vca@triton")
    assert calls == ["forward", "forward", "backward", "backward"]  # Stage I, II; II, I
    assert attention.stream_kernel == "auto"
    run_once(layer, x, True, "vca")
    assert len(calls) == 4


def test_attention_benchmark_measures_memory_alone_and_the_report_shows_it(tmp_path):
    """--no-timing writes memory rows with each mixer's ratio to the first; the report makes
    a table of them (no speed bars), and the counts equal peak_memory_mb called directly."""
    import torch

    from bench.attention import peak_memory_mb

    out = tmp_path / "attention-memory.json"
    cmd = [sys.executable, "-m", "bench.attention", "--widths", "T", "--tokens", "64",
           "--batch", "3", "--no-timing", "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and not any("ms" in r for r in rows)
    for row in rows:
        backward = row["pass"] == "fwd+bwd"
        for kind in ("mhsa", "vca"):
            expected = peak_memory_mb(
                kind, "T", 64, 3, torch.device("cpu"), "fp32", backward, "layer"
            )
            assert row["peak_mb"][kind] == expected
    ratio = rows[0]["peak_mb"]["vca"] / rows[0]["peak_mb"]["mhsa"]
    assert f"| {ratio:.2f}x |" in result.stdout
    report = subprocess.run([sys.executable, "-m", "bench.report", "--dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert report.returncode == 0, report.stderr[-2000:]
    page = (tmp_path / "README.md").read_text()
    assert "## Attention layer, eager, peak memory, memory saved: MHSA against VCA" in page
    assert "| layer | T | 64 | fwd | eager | fp32 | 3 |" in page and f"{ratio:.2f}x" in page
    both = subprocess.run(cmd + ["--no-memory"], cwd=REPO, capture_output=True, text=True)
    assert both.returncode == 2 and "nothing to measure" in both.stderr


def test_mixing_only_equals_the_layer_without_its_projections():
    import torch

    from bench.attention import MixingOnly
    from models.attention import build_attention

    torch.manual_seed(0)
    for kind in ("mhsa", "vca", "diffattn"):
        layer = build_attention(kind, 64, 4, (8, 8), 1)
        x = torch.randn(2, 64, 64)
        with torch.no_grad():
            via_mixing = layer.proj(MixingOnly(layer)(layer.qkv(x)))
            torch.testing.assert_close(via_mixing, layer(x))


def test_live_tensor_bytes_is_the_peak_of_the_storages_alive_at_once():
    """The CPU memory column: new storages count until they are freed; inputs made before,
    views and in-place results add nothing."""
    import torch

    from bench.attention import LiveTensorBytes

    x = torch.ones(1000)
    weight = torch.ones(20, 50)
    with LiveTensorBytes() as counter:
        x_view, weight_t = x[:500], weight.t()  # views of storages made before: nothing
        a = x * 2  # 4000 bytes alive
        b = a + 1  # 8000
        view = b[10:]
        b.mul_(3)
        del a  # 4000
        c = torch.cat([b, b])  # 4000 + 8000: the peak
        del b, view, c, x_view, weight_t
    assert counter.peak == 12000 and counter.live == 0


def test_compile_time_benchmark_compiles_each_attention_in_a_fresh_process(tmp_path):
    """Each attention compiles in its own process (an empty inductor cache); compile time is
    the first step less the later ones, and the report gets a table of it."""
    out = tmp_path / "compile_time.json"
    cmd = [sys.executable, "-m", "bench.compile_time", "--model", "DiT-T/4", "--image-size",
           "64", "--batch", "2", "--backend", "eager", "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["attention"] for r in rows] == ["mhsa", "vca"]
    for row in rows:
        assert abs(row["compile_s"] - (row["first_step_s"] - row["step_s"])) < 1e-9
        assert row["first_step_s"] > row["step_s"] > 0
    report = subprocess.run([sys.executable, "-m", "bench.report", "--dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert report.returncode == 0, report.stderr[-2000:]
    assert "## Cold compile time" in (tmp_path / "README.md").read_text()


def test_the_benchmarks_take_a_stream_kernel_with_each_vca_mixer(capsys):
    """bench.attention, bench.train_step and bench.compile_time take vca@aten, vca@traced and
    vca@triton (compiled, the first is one opaque op and the second the ops inductor fuses);
    an unknown kernel is a usage error."""
    from bench import attention, compile_time, train_step

    for parser in (attention.build_parser(), train_step.build_parser()):
        mixers = ["mhsa", "vca@aten", "vca@traced", "vca@triton"]
        assert parser.parse_args(["--attention", *mixers]).attention == mixers
    with pytest.raises(SystemExit) as error:
        compile_time.main(["--attention", "mhsa", "vca@cuda"])
    assert error.value.code == 2 and "vca@cuda" in capsys.readouterr().err


@pytest.mark.parametrize("tokens", ["255", "0"])
def test_a_token_count_that_tiles_no_square_grid_is_one_line(tmp_path, capsys, tokens):
    """Refused by the parser, before anything is built, printed or written."""
    from bench import attention

    out = tmp_path / "attention.json"
    with pytest.raises(SystemExit) as exit_:
        attention.main(["--tokens", "256", tokens, "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert exit_.value.code == 2 and stdout == "" and not out.exists()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "square grid" in err, err
