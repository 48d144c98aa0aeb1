"""The reference of P9: the script a PEFT user writes to fine-tune a causal LM with LoRA on prompt/completion
data — ``get_peft_model``, ``TrainingArguments``, ``DataCollatorForSeq2Seq``, completion-only labels, the
transformers ``Trainer`` — then held-out accuracy. Run as a whole process by ``benchmarks/e2e_train.py``.

    python -m benchmarks.e2e_peft_trainer --model DIR --output-dir DIR [--steps 30 --batch-size 8 ...]

Only the records come from lorakit (``load_default_task``, so both sides see the same examples) and the
accuracy is lorakit's ``classification_accuracy`` (the same metric on both sides; it computes only the
logits it reads, which makes this side's evaluation as fast as lorakit's). Prints one JSON line:
final training loss (mean of the last 5 steps' logged losses), held-out accuracy, trained tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=640)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=5)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from lorakit.train.data import classification_accuracy, load_default_task

    train_records, heldout = load_default_task(seed=0, heldout_size=max(2, 2 * (args.eval_size // 2)))
    train_records, heldout = train_records[: args.train_size], heldout[: args.eval_size]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)

    def tokenize(record: dict[str, str]) -> dict[str, list[int]]:
        # Completion-only labels: -100 on the prompt; the prompt is cut on the left to fit max_length.
        prompt = tokenizer(record["prompt"])["input_ids"]
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompt = prompt[max(0, len(prompt) + len(completion) - args.max_length):]
        return {"input_ids": prompt + completion, "attention_mask": [1] * (len(prompt) + len(completion)),
                "labels": [-100] * len(prompt) + completion}

    dataset = [tokenize(r) for r in train_records]
    seq2seq = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trained_tokens = [0]

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = seq2seq(features)
        trained_tokens[0] += int(batch["attention_mask"].sum())
        return batch

    training_args = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=args.warmup_steps, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
    )

    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate)
    trainer.train()
    model.save_pretrained(str(Path(args.output_dir) / "adapter"))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    model.eval()
    accuracy, n = classification_accuracy(model, tokenizer, heldout, labels=sorted({r["completion"] for r in heldout}),
                                          batch_size=2 * args.batch_size, max_length=args.max_length)
    print(json.dumps({"final_loss": sum(losses[-5:]) / len(losses[-5:]), "accuracy": accuracy, "n": n,
                      "trained_tokens": trained_tokens[0]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
