"""`log_trainer_dataset` records what the index was made from: the data files (as given and
absolute) and the model path, beside the per-sample digests; without them the index says so
(no paths), instead of the bundled corpus a copied example used to record. It logs in eval mode
(a model left in train mode with dropout would be refused) and restores the mode."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workers"))
from hf_texts import Texts


def test_trainer_helper_records_data_and_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from logra_dist import LoGraConfig
    from logra_dist.integrations.hf_trainer import log_trainer_dataset

    data = Texts(5)
    source = tmp_path / "train.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in data.texts))
    config = LlamaConfig(
        vocab_size=len(data.tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=data.tok.pad_token_id,
        attention_dropout=0.1,  # left on, in train mode, as after trainer.train()
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "model")
    args = TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to="none", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=data.collate)
    model.train()
    logra = LoGraConfig(k_in=2, k_out=2)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        manifest = log_trainer_dataset(
            trainer, logra, tmp_path / "index", batch_size=2, data=["train.jsonl"], model_path=tmp_path / "model"
        )
    finally:
        os.chdir(cwd)
    assert model.training and all(m.training for m in model.modules())  # the pass ran in eval mode, then restored
    assert manifest["metadata"]["data"] == ["train.jsonl"]
    assert manifest["metadata"]["model_path"] == str(tmp_path / "model")
    assert manifest["data"]["paths"] == ["train.jsonl"] and manifest["data"]["abs_paths"] == [str(source)]
    assert manifest["data"]["samples"] == 5 and len(manifest["data"]["digest"]) == 16
