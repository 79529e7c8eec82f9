"""benchmarks/peers.py's own logic (standard library only: no venv, no model): shard merging, the README
headline block, spec display."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    """Import ``benchmarks/<name>.py`` (registered in sys.modules: its dataclasses need that)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def peers():
    return _load("peers")


def _row(label, order, ppl=None, reference=False):
    return {"spec": label, "family": "kvcompress", "reference": reference, "order": order,
            "ppl": {"ppl": ppl if ppl is not None else 20.0, "dppl_pct": 0.0}}


def _shard(rows, wall, rss, skipped=()):
    return {"methods": rows, "skipped": list(skipped), "wall_s": wall, "peak_rss_bytes": rss,
            "config": {"shard": [0, 2]}, "command": None}


def test_merge_shards_restores_order_and_keeps_one_reference(peers):
    ref = _row("full", 0, 18.0, reference=True)
    a = _shard([ref, _row("a", 1), _row("c", 3)], 10.0, 100, [{"peer": "x", "reason": "r"}])
    b = _shard([dict(ref), _row("b", 2), _row("d", 4)], 12.0, 300, [{"peer": "x", "reason": "r"}])
    merged = peers.merge_shards([a, b])
    assert [m["spec"] for m in merged["methods"]] == ["full", "a", "b", "c", "d"]
    assert merged["wall_s"] == 12.0 and merged["peak_rss_bytes"] == 300
    assert merged["skipped"] == [{"peer": "x", "reason": "r"}]
    assert merged["config"]["jobs"] == 2 and merged["config"]["shard"] is None


def test_merge_shards_refuses_disagreeing_references(peers):
    a = _shard([_row("full", 0, 18.0, reference=True), _row("a", 1)], 1.0, 1)
    b = _shard([_row("full", 0, 18.5, reference=True), _row("b", 2)], 1.0, 1)
    with pytest.raises(SystemExit, match="disagree"):
        peers.merge_shards([a, b])


def test_short_spec_keeps_only_the_calibration_file_name(peers):
    assert peers._short_spec("kvquant:bits=3,calibration=/a/b/kv.safetensors") == "kvquant:bits=3,calibration=kv.safetensors"
    assert peers._short_spec("kvquant:calibration=results/kv.safetensors,bits=2") == "kvquant:calibration=kv.safetensors,bits=2"
    assert peers._short_spec("snapkv:budget=0.5") == "snapkv:budget=0.5"


def test_headline_block_replaced_between_markers(peers, tmp_path):
    md = ("```\ncmd\n```\n\nsetup line\n\n"
          "| method | family | r@P | r@P+C | dppl | KL | needle | TTFT | decode | note |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n"
          "| `full` | ours | 1.00x | 1.00x | +0.00 | 0 | 3/3 | 1 | 1 |  |\n\n"
          "stored-bytes ratio = long explanation\n\npeak RSS 1 MiB; wall 2 s.\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{peers.README_BEGIN}\nold table\n{peers.README_END}\noutro\n")
    peers.update_readme(readme, md, tmp_path / "res" / "pareto.png")
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "| method | family | r@P | dppl | needle | TTFT | decode |" in text
    assert "| `full` | ours | 1.00x | +0.00 | 3/3 | 1 | 1 |" in text
    assert "![ratio vs Δppl](res/pareto.png)" in text
    assert "long explanation" not in text and "peak RSS" not in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no"):
        peers.update_readme(readme, md, tmp_path / "p.png")


def test_runner_shard_argument():
    import argparse

    runner = _load("peers_runner")
    assert runner._shard("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "1", "a/b"):
        with pytest.raises(argparse.ArgumentTypeError):
            runner._shard(bad)


def test_failed_install_is_reported_and_the_rest_carries_on(peers, tmp_path, monkeypatch, capsys):
    """A peer whose pip install fails is recorded with pip's last lines and skipped; the other steps still run."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / "Scripts").mkdir()
    (venv / "Scripts" / "python.exe").write_text("")
    monkeypatch.setattr(peers, "VENV", venv)
    monkeypatch.setattr(peers, "STATUS", venv / "peers-install.json")
    calls = []

    class Done:
        def __init__(self, rc, err=""):
            self.returncode, self.stderr, self.stdout = rc, err, ""

    def fake_run(cmd, **kw):
        calls.append(cmd)
        if "hqq" in cmd:
            return Done(1, "ERROR: No matching distribution found for hqq")
        return Done(0)

    monkeypatch.setattr(peers.subprocess, "run", fake_run)
    status = peers.ensure_venv()
    assert [c[-1] for c in calls][:1] == ["torch==2.13.0"] and len(calls) == len(peers.INSTALL_STEPS)
    assert not status["hqq"]["ok"] and "No matching distribution" in status["hqq"]["error"]
    assert all(v["ok"] for k, v in status.items() if k != "hqq")
    assert "could not install hqq" in capsys.readouterr().out
    calls.clear()
    peers.ensure_venv()  # a second call retries only the failed step
    assert len(calls) == 1 and "hqq" in calls[0]


def test_merge_speed_replaces_only_the_speed_and_drops_rows_it_did_not_measure(peers):
    ref = _row("full", 0, 18.0, reference=True)
    ref["speed"] = {"ttft_ratio": 1.0, "decode_ratio": 1.0, "reference": True}
    kv = _row("kvquant:bits=3,calibration=/old/place/kv.safetensors", 1)
    kv["speed"] = {"ttft_ratio": 0.5, "decode_ratio": 0.5}
    gone = _row("hf-quant:hqq@4bit", 2)
    gone["speed"] = {"ttft_ratio": 0.6, "decode_ratio": 0.6}
    full = {"methods": [ref, kv, gone], "config": {"speed": {"context": 1024, "steps": 32, "repeats": 3}},
            "versions": {"torch": "2.13.0", "transformers": "5.2.0"}, "command": "full-run"}
    new_kv = {"spec": "kvquant:bits=3,calibration=/new/place/kv.safetensors", "family": "kvcompress",
              "speed": {"ttft_ratio": 0.97, "decode_ratio": 1.04}}
    speed = {"methods": [dict(ref, ppl=None), new_kv], "config": {"speed": {"context": 1024, "steps": 32, "repeats": 3},
                                                                  "jobs": 2},
             "versions": {"torch": "2.13.0", "transformers": "5.2.0", "threads": 1}, "wall_s": 900.0,
             "command": "python benchmarks/peers.py --speed-only"}
    merged = peers.merge_speed(full, speed, "2026-12-04")
    kv_row, gone_row = merged["methods"][1], merged["methods"][2]
    assert kv_row["speed"]["decode_ratio"] == 1.04 and kv_row["ppl"] == kv["ppl"]  # quality kept, speed replaced
    assert "speed" not in gone_row and merged["speed_run"]["missing"] == ["hf-quant:hqq@4bit"]
    assert merged["methods"][0]["speed"]["reference"] and full["methods"][1]["speed"]["decode_ratio"] == 0.5
    assert merged["command"] == "full-run" and merged["speed_run"]["jobs"] == 2
    md = peers.markdown(dict(merged, model={"name": "m", "dtype": "f32"}, peak_rss_bytes=1, wall_s=1, skipped=[],
                             data={"source": "/x", "sha256": "0" * 64},
                             config=dict(merged["config"], windows=1, prompt_len=8, cont_len=8),
                             versions=dict(full["versions"], kvpress=None, hqq=None, threads=1,
                                           **{"optimum-quanto": None})))
    assert "re-measured on 2026-12-04 by `python benchmarks/peers.py --speed-only`" in md
    assert "speed not re-measured: `hf-quant:hqq@4bit`" in md
    assert "| 1.04x |" in md
