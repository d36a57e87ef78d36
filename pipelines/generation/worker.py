"""The generation worker: what every actor of a Ray Data generation pool runs, and what
`relaygpt generate` runs in-process. Loads a model directory once, answers batches of rows.
Nothing here imports Ray."""

from __future__ import annotations

import json


class GenerationWorker:
    """Loads a model directory once; turns batches of rows into completions (a Ray Data actor)."""

    def __init__(self, model_dir: str, params: dict, chat: bool, batch_size: int = 16, threads: int | None = None) -> None:
        import torch

        from model.export import load_model_dir
        from model.generate import SamplingParams, prepare_for_inference

        if threads:
            torch.set_num_threads(threads)
        self.model, self.tokenizer, _ = load_model_dir(model_dir)
        prepare_for_inference(self.model)
        self.params = SamplingParams(**params)
        self.chat, self.batch_size = chat, batch_size

    def generate_rows(self, rows: list[dict]) -> list[dict]:
        """Completions; or, for rows of {"context", "continuations"} (multiple choice), the
        log-likelihood of every continuation."""
        from pipelines.generation.rows import complete_rows, score_rows

        if rows and "continuations" in rows[0]:
            return score_rows(self.model, self.tokenizer, rows, batch_size=self.batch_size)
        return complete_rows(self.model, self.tokenizer, rows, self.params, chat=self.chat, batch_size=self.batch_size)

    def __call__(self, batch: dict) -> dict:
        """A Ray Data batch of {"_index", "_row" (JSON)} -> {"_index", "_result" (JSON)}."""
        indices = [int(i) for i in _plain(batch["_index"])]
        rows = [json.loads(r) for r in _plain(batch["_row"])]
        done = self.generate_rows(rows)
        return {"_index": indices, "_result": [json.dumps(d, ensure_ascii=False) for d in done]}


def _plain(value):
    """numpy scalars / arrays from Ray Data back to Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value

