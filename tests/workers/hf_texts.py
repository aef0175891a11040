"""Dataset and collator shared by the Trainer worker and its test's single-process reference."""

import torch

from logra_dist.embedded import build_tokenizer


class Texts(torch.utils.data.Dataset):
    """n short texts of different lengths (so batches are padded), tokenized on access."""

    def __init__(self, n: int):
        self.tok = build_tokenizer()
        self.texts = [f"sample {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 4) for i in range(n)]

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return {"input_ids": self.tok(self.texts[i])["input_ids"][:64]}

    def collate(self, items):
        width = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), width), self.tok.pad_token_id)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for r, x in enumerate(items):
            ids[r, : len(x["input_ids"])] = torch.tensor(x["input_ids"])
            mask[r, : len(x["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
