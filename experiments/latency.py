"""No inference latency after merging (paper Table 1): forward latency of base, LoRA merged/unmerged and
adapter layers (Houlsby, Lin), as a ratio to the base model, median of interleaved runs.

Models: GPT-2 medium shapes (d=1024, 16 heads, random init; fewer than 24 blocks, see --gpt2-layers: every
block is identical, so the per-block ratio does not depend on depth) and the real SmolLM2-135M-Instruct
(its first --smol-layers blocks, real weights).
Both run without the LM head (the same for every variant: it would only dilute the ratios).

Variants (bottlenecks sized to LoRA's parameter budget: LoRA r=4 on GPT-2's c_attn and a bottleneck of 8
both cost 2·8·d = 16,384 parameters per block at d=1024):
- base: the model as loaded;
- LoRA merged: lorakit LoRA (r=4 on c_attn for GPT-2, r=8 on q_proj,v_proj for SmolLM2) with B ≠ 0, merged;
- LoRA unmerged: the same adapter kept as a side branch (h = W0·x + s·B·A·x);
- AdapterH (Houlsby et al. 2019): bottleneck adapter h + W_up·GELU(W_down·h) after the attention output
  projection and after the MLP, bottleneck 8;
- AdapterL (Lin et al. 2020): one adapter h + W_up·ReLU(W_down·LN(h)) after the MLP only, bottleneck 8.
The adapter layers are comparison points written here, not lorakit features.

    .venv/bin/python experiments/latency.py                       # full: docs/experiments/latency.{md,png}
    .venv/bin/python experiments/latency.py --quick --out /tmp/x  # CI
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _common  # noqa: E402

from benchmarks.common import aten_ops, flops, interleave  # noqa: E402

BOTTLENECK = 8
PAPER = ("GPT-2 medium, Quadro RTX8000, 100 trials: AdapterL/AdapterH add +2.2 % … +30.3 % latency, the most "
         "at batch 1 × seq 128 and the least at batch 32 × seq 512; merged LoRA adds 0 by construction.")


class BottleneckAdapter(nn.Module):
    """h + W_up·act(W_down·norm(h)): the adapter layer of Houlsby (act=GELU, no norm) or Lin (ReLU, LayerNorm).

    W_up is initialised non-zero so the adapter does real work (the timing does not depend on the values).
    """

    def __init__(self, dim: int, bottleneck: int, act: nn.Module, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.down = nn.Linear(dim, bottleneck)
        self.act = act
        self.up = nn.Linear(bottleneck, dim)
        nn.init.normal_(self.up.weight, std=1e-3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h (N, T, dim)
        return h + self.up(self.act(self.down(self.norm(h))))


class After(nn.Module):
    """Runs ``module`` then ``adapter`` on its output (module replacement, keeps the module's weights)."""

    def __init__(self, module: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.adapter = adapter

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.adapter(self.module(*args, **kwargs))


def sites(model: nn.Module) -> tuple[list[tuple[nn.Module, str]], list[tuple[nn.Module, str]]]:
    """(attention output projections, MLP output projections) as (parent, attribute) pairs."""
    attn, mlp = [], []
    for name, _ in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        parent_name = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if leaf == "o_proj" or (leaf == "c_proj" and parent_name == "attn"):
            attn.append((parent, leaf))
        elif leaf == "down_proj" or (leaf == "c_proj" and parent_name == "mlp"):
            mlp.append((parent, leaf))
    return attn, mlp


def with_adapters(base: nn.Module, dim: int, kind: str) -> nn.Module:
    model = copy.deepcopy(base)
    attn, mlp = sites(model)
    places = attn + mlp if kind == "houlsby" else mlp
    for parent, attr in places:
        adapter = (BottleneckAdapter(dim, BOTTLENECK, nn.GELU(), norm=False) if kind == "houlsby"
                   else BottleneckAdapter(dim, BOTTLENECK, nn.ReLU(), norm=True))
        setattr(parent, attr, After(getattr(parent, attr), adapter))
    return model.eval()


def with_lora(base: nn.Module, targets: list[str], r: int, merged: bool) -> nn.Module:
    from lorakit import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(std=1e-3)  # a trained adapter: B ≠ 0
    if merged:
        peft.merge_adapter()
    return peft.eval()


def extra_params(model: nn.Module, base: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in base.parameters())


def measure(label: str, base: nn.Module, dim: int, targets: list[str], r: int, shapes: list[tuple[int, int]],
            rounds: int, vocab: int) -> list[dict[str, Any]]:
    variants = {
        "base": base,
        "LoRA merged": with_lora(base, targets, r, merged=True),
        "LoRA unmerged": with_lora(base, targets, r, merged=False),
        "AdapterH (Houlsby)": with_adapters(base, dim, "houlsby"),
        "AdapterL (Lin)": with_adapters(base, dim, "lin"),
    }
    params = {name: extra_params(m, base) for name, m in variants.items()}
    rows = []
    for batch, seq in shapes:
        ids = torch.randint(0, vocab, (batch, seq))
        calls = {name: (lambda m=m, ids=ids: m(input_ids=ids)) for name, m in variants.items()}
        with torch.inference_mode():
            # deterministic companions (no timing noise): FLOPs and ATen ops of one forward
            counted = {name: (flops(call), aten_ops(call)) for name, call in calls.items()}
            times = interleave(calls, rounds=rounds, warmup=1, min_sample_s=0.2)
        for name in variants:
            ratios = [a / b for a, b in zip(times[name], times["base"], strict=True)]
            rows.append({"model": label, "batch": batch, "seq": seq, "variant": name, "params": params[name],
                         "ms": 1000 * statistics.median(times[name]), "ratio": statistics.median(ratios),
                         "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds": rounds,
                         "flop_ratio": counted[name][0] / counted["base"][0], "ops": counted[name][1],
                         "extra_ops": counted[name][1] - counted["base"][1]})
            print(f"{label} {batch}×{seq} {name:20s} {rows[-1]['ms']:9.1f} ms  ratio {rows[-1]['ratio']:.3f}",
                  flush=True)
    return rows


def gpt2_medium(layers: int) -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_layer=layers, n_embd=1024, n_head=16, n_positions=1024)
    torch.manual_seed(0)
    return GPT2Model(config).eval()


def smollm2(layers: int) -> nn.Module:
    """SmolLM2's decoder (no LM head), its first ``layers`` real blocks (all 30 when ``layers`` ≥ 30)."""
    from lorakit.train.defaults import ensure_default_model
    from lorakit.train.loop import load_causal_lm

    model, _ = load_causal_lm(ensure_default_model())
    decoder = model.model
    if layers < len(decoder.layers):
        decoder.layers = decoder.layers[:layers]
        decoder.config.num_hidden_layers = layers
    return decoder.eval()


def render(out: Path, rows: list[dict], args: Any, threads: int) -> None:
    header = ["model", "batch × seq", "variant", "extra params", "median ms", "time ratio to base (median)",
              "ratio range over rounds", "FLOP ratio", "ATen ops (extra)"]
    body = [[r["model"], f"{r['batch']} × {r['seq']}", r["variant"], f"{r['params']:,}", f"{r['ms']:.1f}",
             f"**{r['ratio']:.3f}**" if r["variant"] != "base" else "1", f"{r['ratio_min']:.3f}–{r['ratio_max']:.3f}",
             f"{r['flop_ratio']:.4f}", f"{r['ops']:,} ({r['extra_ops']:+,})"]
            for r in rows]
    merged = [r for r in rows if r["variant"] == "LoRA merged"]
    small = [r for r in rows if r["variant"].startswith("Adapter") and r["batch"] * r["seq"] == min(
        x["batch"] * x["seq"] for x in rows)]
    within = all(abs(r["ratio"] - 1) <= 0.02 for r in merged)
    slower = all(r["ratio"] > 1.02 for r in small)
    text = [
        f"# No inference latency after merging (paper Table 1){' — QUICK MODE (not a result)' if args.quick else ''}",
        "",
        _common.provenance(threads),
        f"- GPT-2 medium shapes: d=1024, 16 heads, random init, **{args.gpt2_layers} of 24 blocks** (every block is "
        "identical, so a per-block overhead ratio does not depend on depth; the LM head is left out for all "
        f"variants); SmolLM2-135M-Instruct: real weights, **its first {args.smol_layers} of 30 blocks** (same reasoning), "
        "no LM head",
        f"- shapes run (the paper's 1×128, 16×256, 32×512 scaled to a 2-core CPU): "
        f"GPT-2 M {', '.join(f'{b}×{s}' for b, s in args.gpt2_shapes)}; "
        f"SmolLM2 {', '.join(f'{b}×{s}' for b, s in args.smol_shapes)}",
        f"- fp32, inference mode, {args.rounds} interleaved rounds after one warm-up, each sample ≥ 0.2 s; ratio = "
        "median over rounds of (variant time / base time in the same round); FLOPs "
        "(`torch.utils.flop_counter`) and ATen op counts of one forward are exact and do not drift with load",
        f"- LoRA: r=4 on c_attn (GPT-2) / r=8 on q_proj,v_proj (SmolLM2), B ≠ 0; adapter layers: bottleneck "
        f"{BOTTLENECK} (GPT-2 M: {BOTTLENECK}·2·1024 = 16,384 parameters per adapter, the same as LoRA r=4 on "
        "c_attn per block)",
        "",
        _common.table(header, body),
        "",
        "![latency ratios](latency.png)",
        "",
        "## Compared with the paper",
        "",
        f"Paper: {PAPER}",
        "",
        "Merged LoRA here (time ratio): " + ", ".join(f"{r['model']} {r['batch']}×{r['seq']}: {r['ratio']:.3f}"
                                                     for r in merged)
        + (" — within ±2 % of the base everywhere, as the paper claims." if within else
           " — **not all within ±2 % by timing**, but look at the ratio ranges: on this shared 2-core machine "
           "(see the load average above) single rounds vary by tens of percent in both "
           "directions, so the timing cannot resolve ±2 %; merged ratios below 1 are noise too.")
        + " The exact measures settle it: merged LoRA runs **" + ", ".join(
            sorted({f"{r['flop_ratio']:.4f}× the base FLOPs with {r['extra_ops']:+d} ATen ops" for r in merged}))
        + "** — the same computation as the base (merging leaves a plain weight; lorakit's wrapper adds Python "
        "dispatch only, no tensor op).",
        "",
        "Adapter layers at the smallest shape (time ratio): " + ", ".join(
            f"{r['model']} {r['variant']}: {r['ratio']:.3f} ({r['extra_ops']:+d} ops)" for r in small)
        + (" — slower than the base, as in the paper." if slower else
           " — not all measurably slower (> +2 %) by timing here.")
        + " Every adapter layer adds sequential ops on the critical path (down-projection, activation, "
          "up-projection, residual add, and a LayerNorm for Lin); unmerged LoRA adds a similar number, merging "
          "removes them.",
        "",
        "Why the sizes differ from the paper: on a GPU at batch 1 the extra adapter layers are extra *sequential "
        "kernel launches* that the hardware cannot overlap, which is where the paper's +20–30 % comes from. On a "
        "CPU each op already takes long relative to its dispatch cost, so the relative overhead of a tiny "
        "bottleneck is smaller (their FLOP ratios above are ≤ 1.01) and mostly per-op dispatch time, which this "
        "shared machine's timing noise hides. Unmerged LoRA pays the same kind of cost (two small matmuls per adapted layer), which merging "
        "removes.",
    ]
    (out / "latency.md").write_text("\n".join(text) + "\n")

    plt = _common.pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), dpi=100, squeeze=False)
    names = [n for n in dict.fromkeys(r["variant"] for r in rows) if n != "base"]
    for ax, model in zip(axes[0], models, strict=True):
        shapes = list(dict.fromkeys((r["batch"], r["seq"]) for r in rows if r["model"] == model))
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            vals = [next(r["ratio"] for r in rows if r["model"] == model and (r["batch"], r["seq"]) == s
                         and r["variant"] == name) for s in shapes]
            ax.bar([i + k * width for i in range(len(shapes))], vals, width, label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhspan(0.98, 1.02, color="green", alpha=0.1, label="±2 %")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], [f"{b}×{s}" for b, s in shapes])
        ax.set_ylim(0.9, max(1.1, max(r["ratio"] for r in rows) + 0.05))
        ax.set_title(model, fontsize=9)
        ax.set_ylabel("forward latency / base (median)")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency.png")
    plt.close(fig)


def shape_list(text: str) -> list[tuple[int, int]]:
    return [(int(b), int(s)) for b, s in (item.split("x") for item in text.split(","))]


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--gpt2-layers", type=int, default=None)
    p.add_argument("--gpt2-shapes", type=shape_list, default=None, help="e.g. 1x128,4x256,2x512")
    p.add_argument("--smol-shapes", type=shape_list, default=None)
    p.add_argument("--smol-layers", type=int, default=None, help="keep the first N of SmolLM2's 30 blocks")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--no-smollm2", action="store_true")
    args = p.parse_args()
    out = _common.out_dir(args)
    threads = _common.set_threads(args)
    if args.quick:
        defaults = dict(gpt2_layers=1, gpt2_shapes=[(1, 32), (2, 64)], smol_layers=2, smol_shapes=[(1, 16)],
                        rounds=3)
    else:  # sized for a loaded 2-core CPU (~10 min): the paper's 1×128, 16×256, 32×512 scaled down
        defaults = dict(gpt2_layers=1, gpt2_shapes=[(1, 128), (4, 128), (4, 256)], smol_layers=4,
                        smol_shapes=[(1, 128), (4, 128), (4, 256)], rounds=9)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    rows = measure("GPT-2 M shapes", gpt2_medium(args.gpt2_layers), 1024, ["c_attn"], 4, args.gpt2_shapes,
                   args.rounds, 50257)
    if not args.no_smollm2:
        rows += measure("SmolLM2-135M", smollm2(args.smol_layers), 576, ["q_proj", "v_proj"], 8, args.smol_shapes, args.rounds,
                        49152)
    render(out, rows, args, threads)
    print(f"wrote {out / 'latency.md'} and {out / 'latency.png'}")


if __name__ == "__main__":
    main()
