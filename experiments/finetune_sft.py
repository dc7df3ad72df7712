"""Instruction tuning (SFT) of a GPT-2-shaped decoder on a multi-turn chat built from the standard library.

    python -m experiments.finetune_sft                                 # a few minutes on 2 CPU cores
    python -m experiments.finetune_sft finetune.method=lora            # or prefix; also checkpoint.init_from=RUN
    python -m experiments.finetune_sft data.paths=my_chats.jsonl       # your `messages` or instruction/output JSONL

Each conversation (experiments.finetune_tasks.line_kind_chats): two Python source lines, each answered with its
kind (comment, import, def, other), then "first?", answered with the first line's kind again. Conversations are
rendered with t5like's written-down template (t5like.data.chat; a Hugging Face tokenizer's own chat_template when
data.tokenizer_path is one), packed with segment ids, and the loss covers the assistant turns only. Writes
held-out exact match of every assistant turn (greedy, from the true history), the un-tuned model's and the
most-common-answer baseline's into WORKDIR/summary.json ("task"). Ask the run a question afterwards:
    python -m t5like.generate --workdir runs/finetune_sft --chat conversation.json
"""
import dataclasses

from experiments import finetune_tasks
from t5like import train
from t5like.config import (CheckpointConfig, Config, FinetuneConfig, MeshConfig, OptimConfig, TrainConfig,
                           model_preset)
from t5like.data import DataConfig

TASK_FILE = "runs/finetune_data/line_kind_chats.jsonl"


def config() -> Config:
    return Config(
        model=dataclasses.replace(model_preset("gpt2_small", "tiny"), vocab_size=1024, max_len=128, dropout=0.0),
        data=DataConfig(source="files", format="jsonl", paths=(TASK_FILE,), objective="sft", seq_len=128,
                        validation_fraction=0.1),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=20, schedule="cosine", weight_decay=0.0),
        train=TrainConfig(steps=300, batch_size=16, eval_every=0, eval_steps=4),
        finetune=FinetuneConfig(method="full"),
        mesh=MeshConfig(data=-1),
        checkpoint=CheckpointConfig(every=1000, keep=1),
        workdir="runs/finetune_sft")


def main(argv=None) -> dict:
    from t5like.chat_metrics import sft_report
    finetune_tasks.ensure(TASK_FILE, finetune_tasks.line_kind_chats)
    result = train.main(config, argv)
    return sft_report(result.config.workdir)


if __name__ == "__main__":
    print(main())
