"""CLI verbs on a user's own tiny model: merge (plain transformers reload, same greedy tokens), inspect, eval,
generate, and --help for every verb."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_byte_tokenizer, randomize_lora, save_tiny_model_dir

from lorakit import LoraConfig, get_peft_model
from lorakit.cli import VERBS, build_parser, main
from lorakit.train.loop import load_causal_lm


@pytest.fixture
def model_and_adapter(tmp_path: Path) -> tuple[Path, Path]:
    model_dir = save_tiny_model_dir(tmp_path / "model", "llama")
    base, _ = load_causal_lm(model_dir)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lora(peft, std=0.3)
    peft.save_pretrained(str(tmp_path / "adapter"))
    return Path(model_dir), tmp_path / "adapter"


def test_every_verb_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert "train" in parser.format_help()
    for module in VERBS:
        verb = module.replace("_", "-")  # a verb module's file name: import_gguf.py is `lorakit import-gguf`
        with pytest.raises(SystemExit) as exit_info:
            main([verb, "--help"])
        assert exit_info.value.code == 0
        assert "usage: lorakit " + verb in capsys.readouterr().out


def test_leading_double_dash_is_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    """`lorakit -- train …` works as under torchrun (whose own parser needs the `--`)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--", "inspect", "--help"])
    assert exit_info.value.code == 0
    assert "usage: lorakit inspect" in capsys.readouterr().out


def test_merge_output_loads_in_plain_transformers(tmp_path: Path, model_and_adapter: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM

    from lorakit import PeftModel

    model_dir, adapter = model_and_adapter
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base, tokenizer = load_causal_lm(model_dir)
    with_adapter = PeftModel.from_pretrained(base, str(adapter)).eval()
    prompt = tokenizer("the cat sat on", return_tensors="pt")
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = with_adapter.generate(**prompt, **kwargs)
        got = merged.generate(**prompt, **kwargs)
        with with_adapter.disable_adapter():
            plain = with_adapter.generate(**prompt, **kwargs)
    assert torch.equal(expected, got)
    assert not torch.equal(expected, plain)  # the adapter matters, so the comparison means something
    # an existing output is refused without --overwrite, with one clear line and nothing changed
    before = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 2
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == before


def test_inspect_prints_what_it_promises(model_and_adapter: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, adapter = model_and_adapter
    assert main(["inspect", str(adapter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["r"] == 4 and info["lora_alpha"] == 8
    assert info["targets"] == ["q_proj", "v_proj", "down_proj"]
    assert len(info["modules"]) == 6 and info["parameters"] == sum(
        (m["A"][0] * m["A"][1] + m["B"][0] * m["B"][1]) for m in info["modules"])
    assert info["file_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size
    assert info["base_fingerprint"].startswith("lkfp")
    assert main(["inspect", str(adapter)]) == 0
    text = capsys.readouterr().out
    assert "model.layers.N.self_attn.q_proj" in text and "fingerprint: lkfp" in text


def test_eval_side_by_side(tmp_path: Path, model_and_adapter: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, adapter = model_and_adapter
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"is {w} short ->", "completion": "Y" if len(w) < 4 else "N"}) + "\n"
                            for w in ["cat", "horse", "ox", "zebra", "emu", "camel"]))
    assert main(["eval", "--model", str(model_dir), "--adapter", str(adapter), "--data", str(data), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results) == {"base", "default"}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["n"] == 6 for r in results.values())
    text_data = tmp_path / "eval.txt"
    text_data.write_text("the cat sat on the mat.\nthe dog ate the bone.\n")
    assert main(["eval", "--model", str(model_dir), "--adapter", str(adapter), "--data", str(text_data)]) == 0
    out = capsys.readouterr().out
    assert "base" in out and "default" in out and "perplexity" in out


def test_generate_with_several_adapters(tmp_path: Path, model_and_adapter: tuple[Path, Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, adapter = model_and_adapter
    args = ["generate", "--model", str(model_dir), "--adapter", str(adapter), "--adapter", f"{adapter}=second",
            "--prompt", "hello", "--max-new-tokens", "5", "--base"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "base:" in out and "default:" in out and "second:" in out
    assert main(args + ["--mixed"]) == 0
    mixed = capsys.readouterr().out
    assert mixed.split("default:")[1].splitlines()[0] == out.split("default:")[1].splitlines()[0]


def test_byte_tokenizer_roundtrip() -> None:
    tokenizer = make_byte_tokenizer()
    assert tokenizer.decode(tokenizer("naïve café")["input_ids"]) == "naïve café"  # type: ignore[attr-defined]
