"""`lorakit combine|resize|extract|analyze` end to end on tiny GPT-2 directories, with adapters written by
lorakit and by PEFT itself; outputs are checked numerically and loaded back by both libraries."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import make_gpt2, randomize_lora
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.analysis import REPORT_SCHEMA, validate_report
from lorakit.arithmetic import resize_adapter
from lorakit.cli import main
from lorakit.layers import LoraLayer

VERBS = ("combine", "resize", "extract", "analyze")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base/ (tiny GPT-2), ours/ (lorakit, r=4 on c_attn+c_proj), theirs/ (PEFT, r=2 on c_attn); B ≠ 0."""
    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tools")
    base = make_gpt2()
    base.save_pretrained(root / "base")
    ours = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                           init_lora_weights=False))
    randomize_lora(ours)
    ours.save_pretrained(root / "ours")
    theirs = peft.get_peft_model(GPT2LMHeadModel.from_pretrained(root / "base"),
                                 peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False,
                                                 fan_in_fan_out=True))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.1)
    theirs.save_pretrained(root / "theirs")
    return {"root": root, "base": root / "base", "ours": root / "ours", "theirs": root / "theirs"}


def _base(dirs: dict[str, Path]) -> nn.Module:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(dirs["base"]).eval()


def _deltas(model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    return {n: m.delta_weight(name).detach() for n, m in model.get_base_model().named_modules()
            if isinstance(m, LoraLayer) and name in m.r}


def _both(dirs: dict[str, Path]) -> PeftModel:
    model = PeftModel.from_pretrained(_base(dirs), dirs["ours"], adapter_name="ours")
    model.load_adapter(dirs["theirs"], adapter_name="theirs")
    return model


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.mark.parametrize("verb", VERBS)
def test_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"lorakit {verb}" in text and "--model" in text and "example:" in text


def test_combine_cat_of_lorakit_and_peft_adapters(dirs: dict[str, Path], tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    out = tmp_path / "mixed"
    assert main(["combine", "--model", str(dirs["base"]), "--adapter", str(dirs["ours"]), "--adapter",
                 str(dirs["theirs"]), "--weights", "0.5", "-1", "--combination-type", "cat", "--output", str(out)]) == 0
    both = _both(dirs)
    ours, theirs = _deltas(both, "ours"), _deltas(both, "theirs")
    assert all(d.abs().max() > 0 for d in [*ours.values(), *theirs.values()])
    expected = {n: 0.5 * d - theirs.get(n, 0) for n, d in ours.items()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] and set(config["rank_pattern"].values()) == {6}  # c_attn: 4 + 2
    mixed = PeftModel.from_pretrained(_base(dirs), out)
    got = _deltas(mixed, "default")
    assert sorted(got) == sorted(expected)
    for name, delta in expected.items():
        torch.testing.assert_close(got[name], delta, atol=1e-5, rtol=0)
    # PEFT reads the combined adapter and computes the same updates.
    reference = peft.PeftModel.from_pretrained(_base(dirs), out)
    for name, delta in expected.items():
        module = reference.base_model.model.get_submodule(name)
        torch.testing.assert_close(module.get_delta_weight("default"), delta, atol=1e-5, rtol=0)


def test_combine_svd_defaults_to_unit_weights(dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "svd"
    assert main(["combine", "--model", str(dirs["base"]), "--adapter", str(dirs["ours"]), "--adapter",
                 str(dirs["theirs"]), "--svd-rank", "6", "--output", str(out)]) == 0
    both = _both(dirs)
    theirs = _deltas(both, "theirs")
    expected = {n: d + theirs.get(n, 0) for n, d in _deltas(both, "ours").items()}
    got = _deltas(PeftModel.from_pretrained(_base(dirs), out), "default")
    for name, delta in expected.items():
        torch.testing.assert_close(got[name], delta, atol=1e-5, rtol=0)


@pytest.mark.parametrize("source", ["ours", "theirs"])
def test_resize(dirs: dict[str, Path], tmp_path: Path, source: str, capsys: pytest.CaptureFixture[str]) -> None:
    out, report_path = tmp_path / "small", tmp_path / "resize.json"
    assert main(["resize", "--model", str(dirs["base"]), "--adapter", str(dirs[source]), "--energy", "0.8",
                 "--rank", "3", "--output", str(out), "--report", str(report_path)]) == 0
    printed = capsys.readouterr().out
    assert "energy kept" in printed and "transformer.h.0.attn.c_attn" in printed
    reference = PeftModel.from_pretrained(_base(dirs), dirs[source], adapter_name="src")
    expected_reports = resize_adapter(reference, "src", "small", rank=3, energy=0.8)
    report = json.loads(report_path.read_text())
    assert [(r["module"], r["new_rank"]) for r in report["layers"]] == [(r.module, r.new_rank) for r in expected_reports]
    for written, expected in zip(report["layers"], expected_reports, strict=True):
        assert written["retained_energy"] == pytest.approx(expected.retained_energy, rel=1e-6)
        assert written["relative_error"] == pytest.approx(expected.relative_error, rel=1e-4, abs=1e-7)
    assert all(0 < layer["retained_energy"] <= 1 and layer["new_rank"] <= 3 for layer in report["layers"])
    assert all(layer["retained_energy"] >= 0.8 or layer["new_rank"] == 3 for layer in report["layers"])
    got = _deltas(PeftModel.from_pretrained(_base(dirs), out), "default")
    for name, delta in _deltas(reference, "small").items():
        torch.testing.assert_close(got[name], delta, atol=1e-6, rtol=0)


def test_extract_exact_for_low_rank_finetune(dirs: dict[str, Path], tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base = _base(dirs)
    finetuned = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in finetuned.named_modules():
            if name.endswith(("attn.c_attn", "mlp.c_fc")):
                w = module.weight  # Conv1D: (in, out)
                w += 0.2 * torch.randn(w.shape[0], 2) @ torch.randn(2, w.shape[1])
    finetuned.save_pretrained(tmp_path / "tuned")
    out = tmp_path / "extracted"
    assert main(["extract", "--model", str(dirs["base"]), "--finetuned", str(tmp_path / "tuned"), "--rank", "2",
                 "--target-modules", "c_attn", "c_fc", "--output", str(out), "--report", str(tmp_path / "x.json")]) == 0
    report = json.loads((tmp_path / "x.json").read_text())
    assert len(report["layers"]) == 4 and all(r["relative_error"] < 1e-5 for r in report["layers"])
    assert report["uncaptured"] == []
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        target = finetuned(ids).logits
        assert (base(ids).logits - target).abs().max() > 1e-2
        ours = PeftModel.from_pretrained(_base(dirs), out)(ids).logits
        theirs = peft.PeftModel.from_pretrained(_base(dirs), out)(ids).logits
    torch.testing.assert_close(ours, target, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theirs, target, atol=1e-4, rtol=1e-4)


def test_analyze_two_adapters_writes_json_and_plots(dirs: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert main(["analyze", "--model", str(dirs["base"]), "--adapter", f"{dirs['ours']}=ours", "--adapter",
                 f"{dirs['theirs']}=peft", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "adapter ours" in printed and "adapter peft" in printed and "φ: ours vs peft" in printed
    report = json.loads((out / "analysis.json").read_text())
    validate_report(report)
    assert [a["name"] for a in report["adapters"]] == ["ours", "peft"]
    assert report["adapters"][1]["source"] == str(dirs["theirs"])
    assert len(report["comparison"]["layers"]) == 2  # c_attn in both layers
    assert sorted(report["plots"]) == sorted(p.name for p in out.glob("*.png")) and len(report["plots"]) == 6
    for name in report["plots"]:
        width, height = _png_size(out / name)
        assert (out / name).stat().st_size > 2000 and width > 200 and height > 200


def test_analyze_finds_base_from_peft_config(dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    # PEFT recorded base_model_name_or_path = the base directory, so --model can be omitted.
    assert json.loads((dirs["theirs"] / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        dirs["base"])
    assert main(["analyze", "--adapter", str(dirs["theirs"])]) == 0
    assert "adapter adapter1" in capsys.readouterr().out


def test_print_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--print-schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(REPORT_SCHEMA))


def test_user_errors_are_one_line_and_write_nothing(dirs: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    model, ours, theirs = str(dirs["base"]), str(dirs["ours"]), str(dirs["theirs"])
    cases = [
        (["resize", "--model", model, "--adapter", ours, "--output", str(tmp_path / "o")], "--rank"),
        (["resize", "--model", model, "--adapter", ours, "--rank", "2", "--output", str(dirs["ours"])], "exists"),
        (["combine", "--model", model, "--adapter", ours, "--adapter", theirs, "--weights", "1",
          "--output", str(tmp_path / "o")], "--weights"),
        (["combine", "--model", model, "--adapter", ours, "--adapter", theirs, "--combination-type", "linear",
          "--output", str(tmp_path / "o")], "equal ranks"),
        (["analyze", "--model", model, "--adapter", ours, "--adapter", ours, "--adapter", ours], "one or two"),
        (["extract", "--model", model, "--finetuned", str(tmp_path / "nope"), "--output", str(tmp_path / "o")],
         "--finetuned"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"lorakit {argv[0]}: error:") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
